"""Prefix cache: full KV blocks shared between requests whose prompts start with the same tokens.

A block is cached once every one of its `block_size` tokens has its KV in the cache. Its key is a
hash chain: sha256 over the parent block's key, the block's token ids and the cache identity (the
model's config digest and the KV layout), so a block matches only after the very same prefix, in
the same model, with the same cache shape. With each block the cache keeps, host side, the routed
expert ids its tokens got when they were computed ([block_size, moe_layers, top_k]): a request
that reuses the block never routes those tokens, yet routing replay (R3) needs a row for each.

A request that replays a recording routes by forced expert ids, so the KV of its blocks is the KV
of that routing, not of the router's: its block keys also hash the ids its block's tokens were
forced to (the parent chain carries those of earlier blocks). It therefore hits only blocks
computed under the very same ids — a rollout's recording replayed again, or another recording
whose prompt routed alike — and never a block a replay of other ids (or free routing) computed.

Lifetime: a cached block is referenced by every running sequence whose block table holds it. When
the last one ends, the block stays cached (least recently released last in line) and counts as
free: the allocator takes it back, dropping its key and its rows, only when its free list cannot
serve a request. A lookup walks the prompt's full blocks from the first and stops at the first
miss; it never covers the last prompt token, whose logits the request must compute.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from engine.failpoints import NO_FAULTS, Failpoints
from engine.kv_cache import BlockAllocator
from engine.routing_replay import model_identity


def cache_identity(model_config, engine, kv_heads: int, world: int) -> str:
    """What a block's KV depends on besides its tokens: the model (its config digest) and how this
    engine computes and lays out KV (dtype, expert form, block size, heads on this rank, ranks)."""
    layout = (f"dtype={engine.dtype} moe_form={engine.moe_form} block_size={engine.block_size} "
              f"layers={model_config.num_layers} kv_heads={kv_heads} head_dim={model_config.head_dim} ranks={world}")
    return f"{model_identity(model_config)} {layout}"


@dataclass
class PrefixCacheStats:
    """Counters since the cache was made (tests assert on them: a hit-vs-miss check on a workload
    that never hit proves nothing)."""

    lookups: int = 0  # sequences that looked up their prompt
    looked_up_tokens: int = 0  # prompt tokens of those sequences
    hits: int = 0  # lookups that reused at least one block
    reused_tokens: int = 0  # prompt tokens served from the cache
    registered_blocks: int = 0  # blocks that entered the cache
    evicted_blocks: int = 0  # cached blocks the allocator took back


@dataclass(frozen=True)
class Hit:
    """What a lookup found: the cached blocks (referenced for the caller), their keys, and the
    routed expert ids of their tokens [num_tokens, moe_layers, top_k] (None: no block)."""

    blocks: tuple[int, ...]
    keys: tuple[bytes, ...]
    rows: np.ndarray | None
    block_size: int

    @property
    def num_tokens(self) -> int:
        return len(self.blocks) * self.block_size


@dataclass
class _Entry:
    key: bytes
    rows: np.ndarray  # [block_size, moe_layers, top_k] int64
    refs: int = 1


@dataclass
class PrefixCache:
    """The cached blocks of one KV cache. `identity` names what the KV depends on besides the tokens
    (model and layout); `rank` only matters to the planted fault prefix.ranks_disagree."""

    allocator: BlockAllocator
    block_size: int
    identity: str
    faults: Failpoints = NO_FAULTS
    rank: int = 0
    stats: PrefixCacheStats = field(default_factory=PrefixCacheStats)

    def __post_init__(self) -> None:
        self._by_key: dict[bytes, int] = {}  # key -> block id
        self._entries: dict[int, _Entry] = {}  # block id -> its entry, while cached
        self._idle: OrderedDict[int, None] = OrderedDict()  # unreferenced cached blocks, oldest first
        self.allocator.reclaimer = self

    @property
    def num_cached(self) -> int:
        return len(self._entries)

    @property
    def num_idle(self) -> int:
        return len(self._idle)

    def key(self, parent: bytes | None, tokens: Sequence[int], forced: np.ndarray | None = None) -> bytes:
        """The chain key of a full block of `tokens` after the block keyed `parent` (None: first).
        `forced`: the expert ids [block_size, moe_layers, top_k] its tokens were made to route by
        (routing replay), in the order replayed (it sets the weights' summation order); None when
        the router chose."""
        digest = hashlib.sha256(self.identity.encode())
        if parent is not None and not self.faults.on("prefix.hash_no_parent"):
            digest.update(parent)
        digest.update(np.asarray(tokens, dtype="<i8").tobytes())
        if forced is not None and not self.faults.on("prefix.key_ignores_replay"):
            digest.update(b"replayed routing")  # no free-routing key can equal a replayed one
            digest.update(np.ascontiguousarray(forced, dtype="<i8").tobytes())
        return digest.digest()

    def lookup(self, prompt: Sequence[int], forced: np.ndarray | None = None) -> Hit:
        """The longest run of cached full blocks at the start of `prompt` that leaves its last token
        to compute. `forced`: the ids the request replays, [at least len(prompt), moe_layers, top_k]
        (None: it routes freely). The blocks found are referenced for the caller (release them with
        `release`)."""
        limit = len(prompt) if self.faults.on("prefix.hit_covers_last_token") else len(prompt) - 1
        blocks, keys, parent = [], [], None
        skip = self.faults.on("prefix.ranks_disagree") and self.rank == 1
        for start in range(0, limit - self.block_size + 1 if not skip else 0, self.block_size):
            span = slice(start, start + self.block_size)
            parent = self.key(parent, prompt[span], None if forced is None else forced[span])
            block = self._by_key.get(parent)
            if block not in self._entries:
                break
            blocks.append(block)
            keys.append(parent)
        for block in blocks:
            self._acquire(block)
        self._count(len(prompt), len(blocks))
        return Hit(tuple(blocks), tuple(keys), self._rows(blocks), self.block_size)

    def _count(self, prompt_tokens: int, hit_blocks: int) -> None:
        self.stats.lookups += 1
        self.stats.looked_up_tokens += prompt_tokens
        self.stats.hits += hit_blocks > 0
        self.stats.reused_tokens += hit_blocks * self.block_size

    def _acquire(self, block: int) -> None:
        self._entries[block].refs += 1
        self._idle.pop(block, None)

    def _rows(self, blocks: list[int]) -> np.ndarray | None:
        if not blocks:
            return None
        rows = np.concatenate([self._entries[b].rows for b in blocks])  # [n * block_size, L, k]
        return np.zeros_like(rows) if self.faults.on("prefix.routing_rows_missing") else rows

    def register(self, block: int, key: bytes, rows: np.ndarray) -> bool:
        """Cache `block`, whose tokens are all computed, under `key`, with its tokens' routed expert
        ids. The caller holds it (one reference). False when another block already holds that key
        (two requests computed the same prefix at once): this one stays private to its sequence."""
        holder = self._entries.get(self._by_key.get(key, -1))
        if holder is not None and holder.key == key:
            return False
        self._by_key[key] = block
        self._entries[block] = _Entry(key, np.array(rows, dtype=np.int64))
        self.stats.registered_blocks += 1
        return True

    def release(self, blocks: Sequence[int]) -> None:
        """A sequence ends: drop its references. Cached blocks stay cached, idle; the rest are free.
        Last blocks first, so that a prompt's tail (the least shared part) is evicted first."""
        for block in reversed(blocks):
            entry = self._entries.get(block)
            if entry is None:
                self.allocator.release([block])
                continue
            entry.refs -= 1
            if entry.refs == 0:
                self._idle[block] = None

    def allocate(self, count: int) -> list[int]:
        return self.allocator.allocate(count)

    def evict(self, count: int) -> list[int]:
        """The allocator's reclaimer: give up to `count` idle blocks, least recently released
        first, forgetting their keys and rows."""
        taken = []
        while self._idle and len(taken) < count:
            block, _ = self._idle.popitem(last=False)
            entry = self._entries.pop(block)
            if not self.faults.on("prefix.stale_after_evict"):
                del self._by_key[entry.key]
            taken.append(block)
        self.stats.evicted_blocks += len(taken)
        return taken


class TokenRows:
    """A sequence's routed expert ids by token position, [tokens, moe_layers, top_k], grown as its
    tokens are computed (the rows its full blocks are cached with)."""

    def __init__(self) -> None:
        self._rows: np.ndarray | None = None
        self.length = 0

    def put(self, start: int, rows: np.ndarray) -> None:
        """Rows of tokens [start, start + len(rows)); `start` is at most the current length."""
        if start > self.length:
            raise ValueError(f"routed rows from token {start}, but only {self.length} are known")
        end = start + len(rows)
        if self._rows is None:
            self._rows = np.zeros((max(end, 16),) + rows.shape[1:], np.int64)
        elif end > len(self._rows):
            grown = np.zeros((max(end, 2 * len(self._rows)),) + self._rows.shape[1:], np.int64)
            grown[:self.length] = self._rows[:self.length]
            self._rows = grown
        self._rows[start:end] = rows
        self.length = max(self.length, end)

    def rows(self, start: int, stop: int) -> np.ndarray:
        if self._rows is None or stop > self.length:
            raise ValueError(f"routed rows [{start}, {stop}) asked for, only {self.length} are known")
        return self._rows[start:stop].copy()
