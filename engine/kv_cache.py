"""Paged KV cache: one owner for the key/value buffers, a block allocator, and slot arithmetic.

Each layer has a key and a value buffer of `num_blocks * block_size` slots, each slot one token's
[kv_heads, head_dim]. A sequence owns a list of blocks (its block table); token position p lives
in slot `table[p // block_size] * block_size + p % block_size`. Layers never allocate cache memory:
they write and read through `KVCache`.
"""

from __future__ import annotations

from typing import Protocol

import paddle

from engine.errors import UserError


class CacheFullError(UserError, RuntimeError):
    """The block pool cannot hold the tokens a step needs."""


class Reclaimer(Protocol):
    """Holds blocks only as a cache (engine/prefix_cache.py) and gives them back on demand."""

    @property
    def num_idle(self) -> int: ...

    def evict(self, count: int) -> list[int]: ...


class BlockAllocator:
    """Hands out and takes back block ids from a fixed pool (lowest id first, for reproducibility).

    A `reclaimer`, when set (the prefix cache), holds blocks that no sequence uses; they count as
    free, and the allocator takes them back only when its free list cannot serve a request."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))
        self.reclaimer: Reclaimer | None = None

    @property
    def num_free(self) -> int:
        """Blocks `allocate` can hand out: the free list and the blocks the reclaimer holds idle."""
        return len(self._free) + (self.reclaimer.num_idle if self.reclaimer is not None else 0)

    def allocate(self, count: int) -> list[int]:
        if count > self.num_free:
            raise CacheFullError(f"KV cache full: need {count} more blocks, {self.num_free} free of "
                                 f"{self.num_blocks}; raise num_kv_blocks or lower max_num_seqs")
        if count > len(self._free):
            self.release(self.reclaimer.evict(count - len(self._free)))
        return [self._free.pop() for _ in range(count)]

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))
        self._free.sort(reverse=True)


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def slots_for(block_table: list[int], start: int, stop: int, block_size: int) -> list[int]:
    """Cache slots of token positions [start, stop) of a sequence with this block table."""
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, stop)]


class KVCache:
    """Key/value buffers for every layer: [num_slots, kv_heads, head_dim] each, zero-initialised."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: str = "float32"):
        """`dtype` is the model's compute dtype (a float64 engine caches float64 keys and values)."""
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        shape = [num_blocks * block_size, kv_heads, head_dim]
        self.keys = [paddle.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.values = [paddle.zeros(shape, dtype=dtype) for _ in range(num_layers)]

    def write(self, layer: int, slots: paddle.Tensor, k: paddle.Tensor, v: paddle.Tensor) -> None:
        """Store k, v [N, kv_heads, head_dim] at `slots` [N] of `layer` (in place)."""
        paddle.scatter_(self.keys[layer], slots, k, overwrite=True)
        paddle.scatter_(self.values[layer], slots, v, overwrite=True)

    def read(self, layer: int, slots: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        """k, v [N, kv_heads, head_dim] stored at `slots` [N] of `layer`."""
        return paddle.gather(self.keys[layer], slots), paddle.gather(self.values[layer], slots)
