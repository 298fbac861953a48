"""Capture sizes: the padded token counts a graph is captured for, and rounding a step up to one.

A step of n tokens replays the graph of the smallest capture size >= n, its extra rows padding.
Steps larger than the largest size run eagerly (and are counted as fallbacks).

Which sizes to capture is configuration: the default ladders and the validation of a size list
live in engine/config.py (which imports nothing from this package); this module turns a
validated list into the padding lookup the graph runner uses.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from engine.config import EngineConfig, check_capture_sizes
from engine.graph.guard import DECODE, PREFILL


@dataclass(frozen=True)
class CaptureSizes:
    """A validated capture-size list: sorted, unique, positive, within the step's token limit."""

    sizes: tuple[int, ...]
    limit: int  # the most tokens one step can hold (max_num_batched_tokens)
    label: str = "capture sizes"

    def __post_init__(self) -> None:
        check_capture_sizes(self.sizes, self.limit, self.label)

    @property
    def largest(self) -> int:
        return self.sizes[-1]

    def padded_size(self, num_tokens: int) -> int | None:
        """The smallest capture size >= num_tokens, or None when the step must run eagerly."""
        if num_tokens <= 0:
            raise ValueError(f"a step has at least one token, got {num_tokens}")
        i = bisect.bisect_left(self.sizes, num_tokens)
        return self.sizes[i] if i < len(self.sizes) else None

    def largest_first(self) -> tuple[int, ...]:
        """Capture order: largest first, so later (smaller) captures reuse memory already reserved."""
        return tuple(reversed(self.sizes))


def capture_sizes_for(engine: EngineConfig) -> dict[str, CaptureSizes]:
    """The engine's capture sizes per phase (PREFILL covers mixed steps too), from the lists its
    config derived and validated once at construction."""
    lists, limit = engine.capture_sizes, engine.max_num_batched_tokens
    return {PREFILL: CaptureSizes(lists.prefill, limit, "prefill_capture_sizes"),
            DECODE: CaptureSizes(lists.decode, limit, "decode_capture_sizes")}
