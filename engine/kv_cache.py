"""Paged KV cache: one owner for the key/value buffers, a block allocator, and slot arithmetic.

Each layer has a key and a value buffer of `num_blocks * block_size` slots, each slot one token's
[kv_heads, head_dim]. A sequence owns a list of blocks (its block table); token position p lives
in slot `table[p // block_size] * block_size + p % block_size`. Layers never allocate cache memory:
they write and read through `KVCache`.
"""

from __future__ import annotations

import paddle

from engine.errors import UserError


class CacheFullError(UserError, RuntimeError):
    """The block pool cannot hold the tokens a step needs."""


class BlockAllocator:
    """Hands out and takes back block ids from a fixed pool (lowest id first, for reproducibility)."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise CacheFullError(f"KV cache full: need {count} more blocks, {len(self._free)} free of "
                                 f"{self.num_blocks}; raise num_kv_blocks or lower max_num_seqs")
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
