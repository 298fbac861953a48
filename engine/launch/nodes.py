"""Which hosts a job spans and which of them this process runs on (`--nnodes N --ips A,B,...`).

What Paddle 3.3.1's launcher wants for a job across hosts, without a rendezvous server: the same
`--nnodes N --ips A,B,... --start_port P --nproc_per_node K` on every host, started once per host,
plus `--host` = this host's address. The launcher finds its node by `--host`'s place in `--ips`
(node i runs global ranks i*K .. i*K+K-1); without `--host` it guesses the address from the host
name and, when that guess is not in the list, silently takes node 0's ranks on every host. So this
module finds the host's own address in the list (the one address it can bind) and refuses when it
finds none or several. Rank 0 (on the first address) serves the TCP store on port P, so P must be
the same on every host: multi-node jobs use START_PORT, not a port drawn at random.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

START_PORT = 6070  # Paddle's own default; every host of a job must agree on it


@dataclass(frozen=True)
class Nodes:
    """`ips[i]` is node i; this process runs on node `this`. One node: ips == ('127.0.0.1',)."""

    ips: tuple[str, ...] = ("127.0.0.1",)
    this: int = 0

    def __post_init__(self) -> None:
        if not self.ips or len(set(self.ips)) != len(self.ips):
            raise ValueError(f"--ips must name each node once, got {','.join(self.ips)!r}")
        if not 0 <= self.this < len(self.ips):
            raise ValueError(f"node {self.this} is not one of the {len(self.ips)} nodes")

    @property
    def count(self) -> int:
        return len(self.ips)

    @property
    def multi(self) -> bool:
        return self.count > 1

    def per_node(self, nproc: int) -> int:
        """Ranks on each node of an nproc-rank job (they must divide evenly)."""
        if nproc % self.count:
            raise ValueError(f"{nproc} ranks cannot be split evenly over {self.count} nodes")
        return nproc // self.count

    def local_ranks(self, nproc: int) -> range:
        """The global ranks of an nproc-rank job that run on this node."""
        k = self.per_node(nproc)
        return range(self.this * k, (self.this + 1) * k)

    def launcher_args(self, nproc: int, port: int) -> list[str]:
        """paddle.distributed.launch's node options for this node's share of an nproc-rank job."""
        args = ["--nnodes", str(self.count), "--nproc_per_node", str(self.per_node(nproc)),
                "--ips", ",".join(self.ips), "--start_port", str(port)]
        return [*args, "--host", self.ips[self.this]] if self.multi else args


def from_flags(nnodes: int, ips: str | None) -> Nodes:
    """The CLI's `--nnodes N --ips A,B,...`: validated, this host found among them. N == 1 with no
    --ips is the single-node job. Raises ValueError naming the flag and the value."""
    if nnodes < 1:
        raise ValueError(f"--nnodes must be >= 1, got {nnodes}")
    if ips is None:
        if nnodes > 1:
            raise ValueError(f"--nnodes {nnodes} needs --ips with {nnodes} addresses, one per node")
        return Nodes()
    listed = tuple(part.strip() for part in ips.split(","))
    for address in listed:
        try:
            ipaddress.IPv4Address(address)
        except ValueError:
            raise ValueError(f"--ips: {address!r} is not an IPv4 address") from None
    if len(listed) != nnodes:
        raise ValueError(f"--ips lists {len(listed)} addresses but --nnodes is {nnodes}")
    if nnodes == 1:
        return Nodes(listed)
    mine = [i for i, address in enumerate(listed) if _is_local(address)]
    if len(mine) != 1:
        found = "none" if not mine else ", ".join(listed[i] for i in mine)
        raise ValueError(f"--ips {ips}: exactly one address must belong to this host, found {found}")
    return Nodes(listed, mine[0])


def _is_local(address: str) -> bool:
    """True when this host holds `address` (it can bind a socket to it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((address, 0))
        except OSError:
            return False
    return True
