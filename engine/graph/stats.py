"""CaptureStats: captures, replays, eager fallbacks and recaptures, per (phase, size).

The counters are test oracles: replaying a size twice must show one capture and replays after it,
never a recapture; a step above the largest size must show a fallback.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

Key = tuple[str, int]


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
        return {kind: self.total(kind) for kind in ("captures", "replays", "fallbacks", "recaptures")}
