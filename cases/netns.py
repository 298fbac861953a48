"""Two network namespaces joined by a veth pair: two "hosts" on one machine, for the 2-node cases.

`two_hosts()` creates namespaces gg<tag>a / gg<tag>b, a veth pair between them with the
addresses 10.<x>.<y>.1/30 and .2/30, and `lo` up in each; it yields a `Hosts` and removes both
namespaces (and so the veth pair) on the way out, also after a failure. There is no default route:
traffic goes only between the two namespaces. The tag is unique per process, so parallel pytest
workers never collide. Needs root (CAP_NET_ADMIN) and iproute2; `unavailable()` says why not.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from typing import Iterator

_IP_TIMEOUT_S = 20.0  # one `ip` call; they take milliseconds


@dataclass(frozen=True)
class Host:
    namespace: str
    address: str  # this host's IPv4 address on the veth link
    interface: str  # its veth end, for GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME

    def command(self, argv: list[str]) -> list[str]:
        """`argv` run inside this host's namespace."""
        return [shutil.which("ip") or "ip", "netns", "exec", self.namespace, *argv]


@dataclass(frozen=True)
class Hosts:
    first: Host
    second: Host

    @property
    def ips(self) -> str:
        return f"{self.first.address},{self.second.address}"


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None: they can)."""
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2) to create network namespaces"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CAP_NET_ADMIN); this process is not root"
    return None


@contextlib.contextmanager
def two_hosts() -> Iterator[Hosts]:
    """Create the pair, yield it, always remove it."""
    tag = uuid.uuid4().hex[:6]
    a, b = f"gg{tag}a", f"gg{tag}b"
    subnet = int(tag[:4], 16)  # 10.<x>.<y>.0/30: a different /30 per pair
    prefix = f"10.{(subnet >> 8) % 256}.{subnet % 256}"
    hosts = Hosts(Host(a, f"{prefix}.1", f"v{tag}a"), Host(b, f"{prefix}.2", f"v{tag}b"))
    try:
        for host in (hosts.first, hosts.second):
            _ip("netns", "add", host.namespace)
        _ip("link", "add", hosts.first.interface, "netns", a, "type", "veth",
            "peer", "name", hosts.second.interface, "netns", b)
        for host in (hosts.first, hosts.second):
            _ip("-n", host.namespace, "addr", "add", f"{host.address}/30", "dev", host.interface)
            _ip("-n", host.namespace, "link", "set", host.interface, "up")
            _ip("-n", host.namespace, "link", "set", "lo", "up")
        yield hosts
    finally:
        for host in (hosts.first, hosts.second):  # deleting a namespace deletes its veth end
            subprocess.run(["ip", "netns", "delete", host.namespace], capture_output=True, timeout=_IP_TIMEOUT_S)


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=_IP_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed (exit {done.returncode}): {done.stderr.strip()}")
