"""Batch compositions as data, and staging one on a ModelRunner as a real `Batch`.

A `Composition` says what one step holds: per sequence, how many of its tokens are already in the
KV cache and how many the step computes (prefill chunks, with or without a cached prefix, and
decodes), plus a seed for the token ids. `staged(runner, composition)` builds it for real:
sequences, cache blocks from the runner's allocator, every cached prefix computed by an eager
forward, and the composed `Batch`. Leaving the context gives the blocks back, so a session-cached
engine can stage example after example.

The prefixes always run eagerly, never through graphs, so an eager runner and a graph runner
staged with the same composition hold bitwise-identical caches before the step being compared.
A second runner of the same checkpoint and dtype may take them from the first instead
(`staged(..., prefixes_from=(runner, batch))`): the same eager forward would compute the same
keys and values again, and prefixes are a fifth of test_graph.py's time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import paddle

from engine.kv_cache import blocks_needed, slots_for
from engine.runner import ModelRunner
from engine.scheduler import Batch, Request, Segment, Sequence


@dataclass(frozen=True)
class Part:
    """One sequence's share of the step: `new` tokens after `cached` ones already in the cache.

    A prefill part is a prompt chunk; `rest` prompt tokens follow it (rest > 0: the chunk does not
    finish the prompt and does not sample). A decode part is one generated token after a context
    of `cached` tokens (its whole prompt)."""

    cached: int
    new: int
    rest: int = 0
    decode: bool = False

    def __post_init__(self) -> None:
        if self.cached < 0 or self.new < 1 or self.rest < 0:
            raise ValueError(f"{self}: need cached >= 0, new >= 1, rest >= 0")
        if self.decode and (self.new != 1 or self.rest or self.cached < 1):
            raise ValueError(f"{self}: a decode is one new token after a context of at least one")

    @property
    def prompt_len(self) -> int:
        return self.cached if self.decode else self.cached + self.new + self.rest

    @property
    def num_ids(self) -> int:
        """Token ids the sequence holds: the prompt, plus the generated token of a decode."""
        return self.prompt_len + 1 if self.decode else self.prompt_len

    @property
    def samples(self) -> bool:
        return self.decode or self.rest == 0


@dataclass(frozen=True)
class Composition:
    parts: tuple[Part, ...]
    seed: int = 0  # token ids come from a generator seeded with (seed, part index)

    @property
    def num_tokens(self) -> int:
        return sum(p.new for p in self.parts)

    @property
    def is_decode_only(self) -> bool:
        return all(p.decode for p in self.parts)

    def describe(self) -> str:
        parts = ", ".join(f"decode@{p.cached}" if p.decode else f"chunk {p.new}@{p.cached}+{p.rest}"
                          for p in self.parts)
        return f"{self.num_tokens} tokens: [{parts}] seed {self.seed}"


def sequences(composition: Composition, vocab: int) -> list[Sequence]:
    """The composition's sequences (no blocks yet), request ids 0..n-1, `cached` tokens computed."""
    out = []
    for i, part in enumerate(composition.parts):
        ids = np.random.default_rng([composition.seed, i]).integers(0, vocab, part.num_ids)
        tokens = [int(t) for t in ids]
        request = Request(i, tuple(tokens[: part.prompt_len]), max_new_tokens=2 if part.decode else 1)
        out.append(Sequence(request, tokens, num_computed=part.cached))
    return out


@contextmanager
def staged(runner: ModelRunner, composition: Composition,
           prefixes_from: tuple[ModelRunner, Batch] | None = None) -> Iterator[Batch]:
    """Stage `composition` on `runner` and yield its batch; the blocks go back on exit, however
    the body ends. Several compositions may be staged on one runner at once. `prefixes_from`:
    (a runner of the same checkpoint and dtype, the batch of this composition staged there),
    whose cached prefixes are copied instead of computed again."""
    allocator, block_size = runner.cache.allocator, runner.cache.block_size
    seqs = sequences(composition, runner.model.cfg.vocab_size)
    try:
        for seq, part in zip(seqs, composition.parts):
            seq.block_table = allocator.allocate(blocks_needed(part.cached + part.new, block_size))
        if prefixes_from is None:
            fill_prefixes(runner, seqs, composition.parts)
        else:
            copy_prefixes(*prefixes_from, runner, seqs, composition.parts)
        yield Batch(tuple(Segment(seq, part.cached, part.new, part.samples)
                          for seq, part in zip(seqs, composition.parts)))
    finally:
        for seq in seqs:
            allocator.release(seq.block_table)
            seq.block_table = []


def fill_prefixes(runner: ModelRunner, seqs: list[Sequence], parts: tuple[Part, ...]) -> None:
    """Compute the cached tokens of every sequence with one eager forward (graphs bypassed, no
    counters touched), writing their keys and values to the runner's cache."""
    segments = tuple(Segment(seq, 0, part.cached, samples=False) for seq, part in zip(seqs, parts) if part.cached)
    if segments:
        ctx = replace(runner.prepare(Batch(segments)), padded_size=None)
        runner.eager_forward(ctx)


def copy_prefixes(source: ModelRunner, source_batch: Batch, runner: ModelRunner, seqs: list[Sequence],
                  parts: tuple[Part, ...]) -> None:
    """Copy every sequence's cached keys and values, layer by layer, from `source`'s cache (where
    `source_batch` staged the same composition) to `runner`'s, at each side's own slots."""
    pairs = [(segment.seq, seq, part.cached)
             for segment, seq, part in zip(source_batch.segments, seqs, parts) if part.cached]
    if not pairs:
        return
    read = _prefix_slots([(src.block_table, n) for src, _, n in pairs], source.cache.block_size)
    write = _prefix_slots([(dst.block_table, n) for _, dst, n in pairs], runner.cache.block_size)
    for layer in range(len(runner.cache.keys)):
        keys, values = source.cache.read(layer, read)
        runner.cache.write(layer, write, keys, values)


def _prefix_slots(tables_and_counts: list[tuple[list[int], int]], block_size: int) -> paddle.Tensor:
    """The slots of the first `count` positions of each block table, in order, as one tensor."""
    ids = [slot for table, count in tables_and_counts for slot in slots_for(table, 0, count, block_size)]
    return paddle.to_tensor(np.asarray(ids, dtype=np.int64))
