"""Capture sizes: the padded token counts a graph is captured for, and rounding a step up to one.

A step of n tokens replays the graph of the smallest capture size >= n, its extra rows padding.
Steps larger than the largest size run eagerly (and are counted as fallbacks).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass


class CaptureSizeError(ValueError):
    """A capture-size list that cannot be used; the message names the offending value."""


def default_prefill_sizes(max_tokens: int = 8192) -> tuple[int, ...]:
    """A 4..8192 ladder in the shape of SGLang's piecewise list: every 4 up to 32, then coarser
    steps (16, 32, 128, 256, 512) as sizes grow, 58 sizes in all; cut at `max_tokens`."""
    ladder = [range(4, 33, 4), range(48, 257, 16), range(288, 513, 32), range(640, 2049, 128),
              range(2304, 4097, 256), range(4608, 8193, 512)]
    return tuple(s for r in ladder for s in r if s <= max_tokens) or (max_tokens,)


def default_decode_sizes(max_num_seqs: int = 64) -> tuple[int, ...]:
    """FastDeploy's decode shape, [1, 2, 4] + multiples of 8 up to 128, then of 16; the last size
    covers `max_num_seqs` so no decode step falls back."""
    ladder = [1, 2, 4, *range(8, 129, 8), *range(144, 1025, 16)]
    sizes = [s for s in ladder if s < max_num_seqs]
    return tuple(sizes + [max_num_seqs])


@dataclass(frozen=True)
class CaptureSizes:
    """A validated capture-size list: sorted, unique, positive, within the step's token limit."""

    sizes: tuple[int, ...]
    limit: int  # the most tokens one step can hold (max_num_batched_tokens)
    label: str = "capture sizes"

    def __post_init__(self) -> None:
        sizes = self.sizes
        if not sizes:
            raise CaptureSizeError(f"{self.label}: the list is empty")
        bad = next((s for s in sizes if not isinstance(s, int) or isinstance(s, bool) or s <= 0), None)
        if bad is not None:
            raise CaptureSizeError(f"{self.label}: {bad!r} is not a positive integer")
        for a, b in zip(sizes, sizes[1:]):
            if a >= b:
                raise CaptureSizeError(f"{self.label}: must be sorted and unique, but {a} comes before {b}")
        if sizes[-1] > self.limit:
            raise CaptureSizeError(f"{self.label}: largest size {sizes[-1]} exceeds max_num_batched_tokens="
                                   f"{self.limit}")

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
