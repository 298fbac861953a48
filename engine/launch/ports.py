"""Choosing the TCP port a job's rank 0 serves its store on.

A port from `bind(0)` comes from the kernel's ephemeral range, where any outgoing connection (the
gloo meshes of concurrent jobs open dozens) may take it in the seconds before rank 0 binds it. So
the port is drawn at random below that range and checked bindable now; random choice keeps
concurrent callers (pytest -n 4) apart. A caller who must know the port beforehand (a firewall, a
second job beside a first) names it (`--start-port`), checked by `check_start_port`.
"""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

_LOWEST = 10000  # below this sit well-known and registered service ports
_TRIES = 200
_SYSTEM = 1024  # ports below this are the system's (binding them needs privilege)
_HIGHEST = 65535


def free_port(count: int = 1) -> int:
    """First of `count` consecutive TCP ports that are free now, all below the ephemeral range.
    Raises OSError when `_TRIES` random draws found none (a machine with that few free ports
    would not run a job anyway)."""
    low = ephemeral_range()[0]
    rng = random.Random(os.urandom(8))
    for _ in range(_TRIES):
        first = rng.randrange(_LOWEST, max(low - count, _LOWEST + 1))
        if all(_bindable(first + i) for i in range(count)):
            return first
    raise OSError(f"no {count} consecutive free TCP ports found in [{_LOWEST}, {low}) after {_TRIES} tries")


def ephemeral_range() -> tuple[int, int]:
    """The kernel's (lowest, highest) port for outgoing connections (Linux; the default elsewhere)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


def check_start_port(port: object, count: int, name: str = "--start-port") -> int:
    """`port` as the first of a job's `count` ports on one host (rank 0's store on it, the next
    ones assigned to the host's other ranks by the launcher): an int in [1024, 65536 - count].
    Raises ValueError naming `name` (the flag or parameter the user set) and the range."""
    if isinstance(port, bool) or not isinstance(port, int) or not _SYSTEM <= port <= _HIGHEST + 1 - count:
        raise ValueError(f"{name} must be an integer in [{_SYSTEM}, {_HIGHEST + 1 - count}] (the first of "
                         f"{count} ports, one per rank on this host), got {port!r}")
    return port


def check_free(port: int, name: str = "--start-port") -> None:
    """Raise ValueError naming `name` when `port` cannot be bound on this host now (another job's
    store, or any other server, holds it): the job would otherwise fail later, less clearly."""
    if not _bindable(port):
        raise ValueError(f"{name} {port}: that port is in use on this host; choose another")


def is_listening(port: int, tables: tuple[Path, ...] = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))) -> bool | None:
    """Whether a socket of this host (network namespace) listens on TCP `port`, read from the
    kernel's tables without connecting (a server sees nothing); None where they cannot be read."""
    rows = []
    for table in tables:
        try:
            rows += table.read_text().splitlines()[1:]
        except OSError:
            continue
    if not rows:
        return None
    # fields: sl local_address rem_address st ...; the port is hex after the colon, LISTEN is 0A
    return any(len(f) > 3 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port for f in map(str.split, rows))
