"""The split: which shard of an N-way sharded gate runs which case (pure; no pytest).

A shard is "I/N" (1 <= I <= N). The collection is cut into units: every xdist group (cases marked
`xdist_group`, which share one warm rank job and must run on one worker) is one unit, every other
case is a unit of its own. Each unit goes to exactly one shard:

- units the durations file knows (at least one member has a recorded duration; unknown members
  weigh 0 until the file is refreshed) are dealt heaviest first, each to the least-loaded shard
  (ties: the lower index; equal weights: the unit key in order). Greedy list scheduling: the
  heaviest shard's recorded load is at most total / N + the heaviest unit.
- units it does not know go to shard 1 + sha256(key) mod N: stable across machines and Python
  processes (never Python's salted `hash()`), and adding a new case never moves another.

The split depends only on the ids, the groups and the durations, never on collection order, so
every CI job computes the same partition and each takes its own part.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Iterable, Mapping

_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Shard:
    """Shard `index` (1-based) of `count`."""

    index: int
    count: int

    def __post_init__(self):
        if not 1 <= self.index <= self.count:
            raise ValueError(f"shard {self.index}/{self.count}: want 1 <= I <= N")

    @classmethod
    def parse(cls, text: str) -> "Shard":
        """"I/N" -> Shard; ValueError naming the text otherwise."""
        match = _SPEC.match(text)
        if not match:
            raise ValueError(f"shard {text!r}: want I/N, such as 2/4")
        return cls(int(match[1]), int(match[2]))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass(frozen=True)
class Unit:
    """Cases that go to one shard together: one case, or one xdist group's cases."""

    key: str  # the nodeid of a lone case; "group:NAME" for an xdist group
    members: tuple[str, ...]

    def weight(self, durations: Mapping[str, float]) -> float:
        return sum(durations.get(member, 0.0) for member in self.members)

    def known(self, durations: Mapping[str, float]) -> bool:
        return any(member in durations for member in self.members)


def units_of(cases: Iterable[tuple[str, str | None]]) -> list[Unit]:
    """(nodeid, xdist group or None) pairs -> units, sorted by key; a nodeid given twice is an error."""
    groups: dict[str, list[str]] = {}
    seen: set[str] = set()
    for nodeid, group in cases:
        if nodeid in seen:
            raise ValueError(f"case {nodeid!r} collected twice")
        seen.add(nodeid)
        groups.setdefault(f"group:{group}" if group is not None else nodeid, []).append(nodeid)
    return [Unit(key, tuple(sorted(members))) for key, members in sorted(groups.items())]


def stable_slot(key: str, count: int) -> int:
    """0-based shard of a unit the durations do not know: the same on every machine and process."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % count


def assign(units: Iterable[Unit], count: int, durations: Mapping[str, float]) -> dict[str, int]:
    """Every unit's key -> its 1-based shard."""
    units = list(units)
    known = sorted((u for u in units if u.known(durations)), key=lambda u: (-u.weight(durations), u.key))
    loads = [0.0] * count
    shard_of: dict[str, int] = {}
    for unit in known:
        lightest = min(range(count), key=lambda i: (loads[i], i))
        loads[lightest] += unit.weight(durations)
        shard_of[unit.key] = lightest + 1
    for unit in units:
        if not unit.known(durations):
            shard_of[unit.key] = stable_slot(unit.key, count) + 1
    return shard_of


def select(cases: Iterable[tuple[str, str | None]], shard: Shard, durations: Mapping[str, float]) -> set[str]:
    """The nodeids shard `shard` runs, out of the whole collection `cases` ((nodeid, group) pairs)."""
    units = units_of(cases)
    shard_of = assign(units, shard.count, durations)
    return {member for unit in units if shard_of[unit.key] == shard.index for member in unit.members}
