"""Requests -> steps: continuous batching with chunked prefill.

Each step has a token budget (`max_num_batched_tokens`). Sequences that are decoding get one
token each first; the rest of the budget goes to prompt chunks, oldest request first, so one step
may mix decodes with prefill chunks of several sequences. A sequence only samples when its step
covers the last prompt token or it is decoding. Sampling is greedy, and every request generates
exactly `max_new_tokens` tokens (no stop tokens), so runs are comparable token for token.

With a prefix cache (engine/prefix_cache.py), a sequence looks up its prompt when its first chunk
is scheduled (not when it is queued, so a request that waits behind another with the same prefix
finds the blocks that one has computed meanwhile). A hit puts the cached blocks at the head of its
block table and counts their tokens as computed; the batch carries the hit (`Batch.hits`) so the
engine can hand the cached tokens' routed expert ids on. After every step the full blocks whose
tokens are all computed enter the cache with their routed expert ids; a replayed request's blocks
are keyed with the ids it was forced to route by as well.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from engine.kv_cache import BlockAllocator, blocks_needed, slots_for
from engine.prefix_cache import PrefixCache, TokenRows


@dataclass(frozen=True)
class Request:
    request_id: int
    prompt: tuple[int, ...]
    max_new_tokens: int
    name: str = ""
    reuse_prefix: bool = True  # look the prompt up in the prefix cache (False: compute every token)
    # Routing replay: the ids every token is forced to route by, [tokens, moe_layers, top_k] (None:
    # the router chooses). Its blocks' prefix-cache keys include them (engine/prefix_cache.py).
    forced_routing: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass
class Sequence:
    """A request's state while it runs: its tokens so far and where their KV entries live."""

    request: Request
    tokens: list[int]
    num_computed: int = 0  # tokens whose KV entries are in the cache
    block_table: list[int] = field(default_factory=list)
    block_keys: list[bytes] = field(default_factory=list)  # prefix-cache keys of the leading full blocks
    routed: TokenRows = field(default_factory=TokenRows)  # routed expert ids of the computed tokens
    looked_up: bool = False

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt)

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < self.prompt_len

    @property
    def finished(self) -> bool:
        return self.num_generated >= self.request.max_new_tokens


@dataclass(frozen=True)
class Segment:
    """One sequence's share of a step: tokens [start, start + num_tokens) of its token list."""

    seq: Sequence
    start: int
    num_tokens: int
    samples: bool  # the last row's logits choose the sequence's next token

    @property
    def is_prefill(self) -> bool:
        return self.start < self.seq.prompt_len


@dataclass(frozen=True)
class CachedPrefix:
    """A sequence's prefix-cache hit in this step: its first `num_tokens` tokens, already in the KV
    cache, and their routed expert ids [num_tokens, moe_layers, top_k] (raw order, as routed)."""

    seq: Sequence
    rows: np.ndarray

    @property
    def num_tokens(self) -> int:
        return len(self.rows)


@dataclass(frozen=True)
class Batch:
    segments: tuple[Segment, ...]
    hits: tuple[CachedPrefix, ...] = ()  # prefix-cache hits decided while scheduling this step

    @property
    def reused_tokens(self) -> int:
        return sum(hit.num_tokens for hit in self.hits)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.segments)

    @property
    def is_decode_only(self) -> bool:
        return all(not s.is_prefill for s in self.segments)

    def token_ids(self) -> list[int]:
        return [t for s in self.segments for t in s.seq.tokens[s.start: s.start + s.num_tokens]]

    def positions(self) -> list[int]:
        return [p for s in self.segments for p in range(s.start, s.start + s.num_tokens)]

    def slot_mapping(self, block_size: int) -> list[int]:
        return [slot for s in self.segments
                for slot in slots_for(s.seq.block_table, s.start, s.start + s.num_tokens, block_size)]


class Scheduler:
    """Owns the waiting and running queues and the KV block allocator."""

    def __init__(self, max_num_batched_tokens: int, max_num_seqs: int, allocator: BlockAllocator,
                 block_size: int, prefix: PrefixCache | None = None):
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.allocator = allocator
        self.prefix = prefix
        self.block_size = block_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, request: Request) -> Sequence:
        seq = Sequence(request, list(request.prompt))
        self.waiting.append(seq)
        return seq

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch:
        """Pick the next step's segments and reserve cache blocks for them."""
        budget = self.max_num_batched_tokens
        segments = []
        for seq in self.running:  # decodes first: one token each, oldest first
            if not seq.in_prefill and budget > 0:
                segments.append(self._reserve(seq, 1))
                budget -= 1
        self._admit()
        hits = []
        for seq in self.running:  # then prompt chunks with what is left
            if seq.in_prefill and budget > 0:
                hits.extend(self._lookup(seq))
                chunk = min(seq.prompt_len - seq.num_computed, budget)
                segments.append(self._reserve(seq, chunk))
                budget -= chunk
        return Batch(tuple(segments), tuple(hits))

    def _lookup(self, seq: Sequence) -> list[CachedPrefix]:
        """Once per sequence, before its first chunk: take the cached blocks its prompt starts with."""
        if seq.looked_up or self.prefix is None or not seq.request.reuse_prefix:
            return []
        seq.looked_up = True
        hit = self.prefix.lookup(seq.request.prompt, seq.request.forced_routing)
        if not hit.blocks:
            return []
        seq.block_table = list(hit.blocks)
        seq.block_keys = list(hit.keys)
        seq.num_computed = hit.num_tokens
        seq.routed.put(0, hit.rows)
        return [CachedPrefix(seq, hit.rows)]

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_num_seqs:
            self.running.append(self.waiting.popleft())

    def _reserve(self, seq: Sequence, num_tokens: int) -> Segment:
        end = seq.num_computed + num_tokens
        missing = blocks_needed(end, self.block_size) - len(seq.block_table)
        if missing > 0:
            seq.block_table.extend(self.allocator.allocate(missing))
        samples = end >= seq.prompt_len
        return Segment(seq, seq.num_computed, num_tokens, samples)

    def update(self, batch: Batch, next_tokens: dict[int, int],
               routed: list[np.ndarray] | None = None) -> list[Sequence]:
        """Record the step: advance computed counts, append sampled tokens (keyed by request id),
        cache the blocks it filled (`routed`: per segment, its tokens' routed expert ids
        [num_tokens, moe_layers, top_k]; without them nothing enters the prefix cache), and retire
        finished sequences (their blocks return to the pool, cached ones stay cached). Returns the
        finished."""
        for i, seg in enumerate(batch.segments):
            seg.seq.num_computed = seg.start + seg.num_tokens
            if seg.samples:
                seg.seq.tokens.append(next_tokens[seg.seq.request.request_id])
            if routed is not None and self.prefix is not None:
                seg.seq.routed.put(seg.start, routed[i])
                self._cache_full_blocks(seg.seq)
        done = [seq for seq in self.running if seq.finished]
        for seq in done:
            (self.prefix or self.allocator).release(seq.block_table)
            seq.block_table = []
        self.running = [seq for seq in self.running if not seq.finished]
        return done

    def _cache_full_blocks(self, seq: Sequence) -> None:
        """Offer the prefix cache every block of `seq` that became full and computed."""
        bs, forced = self.block_size, seq.request.forced_routing
        for index in range(len(seq.block_keys), seq.num_computed // bs):
            span = slice(index * bs, (index + 1) * bs)
            key = self.prefix.key(seq.block_keys[-1] if seq.block_keys else None, seq.tokens[span],
                                  None if forced is None else forced[span])
            seq.block_keys.append(key)
            self.prefix.register(seq.block_table[index], key, seq.routed.rows(index * bs, (index + 1) * bs))
