"""Choosing the TCP port a job's rank 0 serves its store on.

A port from `bind(0)` comes from the kernel's ephemeral range, where any outgoing connection (the
gloo meshes of concurrent jobs open dozens) may take it in the seconds before rank 0 binds it. So
the port is drawn at random below that range and checked bindable now; random choice keeps
concurrent callers (pytest -n 4) apart.
"""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

_LOWEST = 10000  # below this sit well-known and registered service ports
_TRIES = 200


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
