"""Which hosts a job spans and which of them this process runs on (`--nnodes N --ips A,B,...`).

What Paddle 3.3.1's launcher wants for a job across hosts, without a rendezvous server: the same
`--nnodes N --ips A,B,... --start_port P --nproc_per_node K` on every host, started once per host,
plus `--host` = this host's address. The launcher finds its node by `--host`'s place in `--ips`
(node i runs global ranks i*K .. i*K+K-1); without `--host` it guesses the address from the host
name and, when that guess is not in the list, silently takes node 0's ranks on every host. So this
module finds the host's own address in the list (the one address it can bind) and refuses when it
finds none or several. Rank 0 (on the first address) serves the TCP store on port P, so P must be
the same on every host: multi-node jobs use START_PORT (or the caller's --start-port), not a
port drawn at random.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

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


    def missing_peers(self, port: int, table: str | None = None) -> str:
        """Which other nodes this host has seen no sign of, judged by the TCP store rank 0 serves on
        node 0's `port`: node 0 sees each peer that reached it as a connection to that port, any
        other node sees node 0 as its own connection to it. 'node 1 (10.0.0.2)'; a phrase saying
        what cannot be told from here otherwise. `table`: /proc/net/tcp's text (None: read it;
        unreadable: nothing is known)."""
        established = _established(table)
        store = self.ips[0]
        others = [i for i in range(self.count) if i != self.this]
        if self.this == 0:
            arrived = {remote[0] for local, remote in established if local == (store, port)}
            absent = [i for i in others if self.ips[i] not in arrived]
            return _names(self, absent) if absent else "none: every node reached rank 0's store"
        if (store, port) not in {remote for _, remote in established}:
            return _names(self, [0]) + f" (its store on {store}:{port} was not reached)"
        rest = [i for i in others if i != 0]
        return f"not known here (node 0's store was reached; the others: {_names(self, rest) or 'none'})"


def _names(nodes: Nodes, indices: list[int]) -> str:
    return ", ".join(f"node {i} ({nodes.ips[i]})" for i in indices)


def _established(table: str | None) -> set[tuple[tuple[str, int], tuple[str, int]]]:
    """(local, remote) (address, port) pairs of this network namespace's established IPv4 TCP
    connections, from /proc/net/tcp (hex addresses in host byte order; state 01 = ESTABLISHED)."""
    if table is None:
        try:
            table = Path("/proc/net/tcp").read_text()
        except OSError:
            return set()
    pairs = set()
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 3 and fields[3] == "01":
            pairs.add((_endpoint(fields[1]), _endpoint(fields[2])))
    return pairs


def _endpoint(text: str) -> tuple[str, int]:
    address, port = text.split(":")
    return socket.inet_ntoa(struct.pack("=I", int(address, 16))), int(port, 16)


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
    mine = [i for i, address in enumerate(listed) if is_local_address(address)]
    if len(mine) != 1:
        found = "none" if not mine else ", ".join(listed[i] for i in mine)
        raise ValueError(f"--ips {ips}: exactly one address must belong to this host, found {found}")
    return Nodes(listed, mine[0])


def is_local_address(address: str) -> bool:
    """True when this host holds `address` (it can bind a socket to it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((address, 0))
        except OSError:
            return False
    return True
