"""CaptureStats: captures, replays, eager fallbacks and recaptures, per (phase, size).

The counters are test oracles, in the spirit of vLLM's compilation counter: replaying a size twice
must show one capture and replays after it, never a recapture; a step above the largest size must
show a fallback. `expect(...)` asserts what a block of code did to them:

    with stats.expect(captures={("prefill", 16): 1}, replays={("prefill", 16): 1}, recaptures={}):
        runner.step(batch)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

Key = tuple[str, int]
KINDS = ("captures", "replays", "fallbacks", "recaptures")
Snapshot = dict[str, Counter]


@dataclass
class CaptureStats:
    captures: Counter = field(default_factory=Counter)
    replays: Counter = field(default_factory=Counter)
    fallbacks: Counter = field(default_factory=Counter)  # keyed by (phase, num_tokens)
    recaptures: Counter = field(default_factory=Counter)

    def record_capture(self, phase: str, size: int) -> None:
        if self.captures[(phase, size)]:
            self.recaptures[(phase, size)] += 1
        self.captures[(phase, size)] += 1

    def record_replay(self, phase: str, size: int) -> None:
        self.replays[(phase, size)] += 1

    def record_fallback(self, phase: str, num_tokens: int) -> None:
        self.fallbacks[(phase, num_tokens)] += 1

    def total(self, kind: str, phase: str | None = None) -> int:
        counter: Counter = getattr(self, kind)
        return sum(n for (p, _), n in counter.items() if phase is None or p == phase)

    def summary(self) -> dict[str, int]:
        return {kind: self.total(kind) for kind in KINDS}

    def snapshot(self) -> Snapshot:
        """A copy of every counter, to diff against later (`since`, `delta_problems`)."""
        return {kind: Counter(getattr(self, kind)) for kind in KINDS}

    def since(self, before: Snapshot) -> Snapshot:
        """What each counter gained since `before` (counters only grow)."""
        return {kind: getattr(self, kind) - before[kind] for kind in KINDS}

    def delta_problems(self, before: Snapshot, **want: Mapping[Key, int]) -> list[str]:
        """For each kind given (captures=, replays=, fallbacks=, recaptures=), the counts gained since
        `before` must be exactly `want[kind]`, per (phase, size); an empty mapping means no change.
        Kinds not given are not checked. Returns one line per kind that differs."""
        unknown = sorted(set(want) - set(KINDS))
        if unknown:
            raise TypeError(f"CaptureStats has no counter {unknown[0]!r}; counters are {KINDS}")
        gained = self.since(before)
        return [f"{kind} changed by {dict(gained[kind])}, want {dict(counts)}"
                for kind, counts in want.items() if gained[kind] != Counter(counts)]

    @contextmanager
    def expect(self, **want: Mapping[Key, int]) -> Iterator[None]:
        """Assert (AssertionError) that the block changed each kind given exactly as `delta_problems`
        describes. Nothing is asserted when the block raises."""
        before = self.snapshot()
        yield
        problems = self.delta_problems(before, **want)
        if problems:
            raise AssertionError("capture counters: " + "; ".join(problems))
