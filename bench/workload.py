"""Prefill steps of an exact token count, built straight from scheduler types.

A step of n tokens is ceil(n / seq_len) fresh sequences (all but the last `seq_len` long), each a
whole-prompt prefill chunk starting at position 0, with cache blocks taken from the runner's own
allocator. Re-running the same step rewrites the same cache slots, so one batch can be timed again
and again.
"""

from __future__ import annotations

import numpy as np

from engine.kv_cache import BlockAllocator, blocks_needed
from engine.scheduler import Batch, Request, Segment, Sequence


def prefill_batch(allocator: BlockAllocator, block_size: int, num_tokens: int, seq_len: int, vocab: int,
                  seed: int = 0) -> Batch:
    rng = np.random.default_rng(seed)
    segments, left = [], num_tokens
    while left:
        length = min(left, seq_len)
        prompt = tuple(int(t) for t in rng.integers(0, vocab, length))
        seq = Sequence(Request(len(segments), prompt, max_new_tokens=1), list(prompt))
        seq.block_table = allocator.allocate(blocks_needed(length, block_size))
        segments.append(Segment(seq, start=0, num_tokens=length, samples=True))
        left -= length
    return Batch(tuple(segments))


def release(allocator: BlockAllocator, batch: Batch) -> None:
    for seg in batch.segments:
        allocator.release(seg.seq.block_table)
        seg.seq.block_table = []


def blocks_for_step(num_tokens: int, seq_len: int, block_size: int) -> int:
    """Cache blocks one step of `num_tokens` holds (its sequences' blocks, rounded up per sequence)."""
    full, rest = divmod(num_tokens, seq_len)
    return full * blocks_needed(seq_len, block_size) + blocks_needed(rest, block_size)
