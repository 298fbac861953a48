"""Causal grouped-query attention over the paged KV cache, batched over the step's sequences.

This is the op the piecewise graphs are split at: it depends on per-sequence metadata (how many
tokens each sequence already has cached, where its blocks are) and writes the cache, so it runs
eagerly between the captured pieces. Rows of `q` beyond the real tokens (graph padding) are never
read; the output has the real rows only and the graph runner pads it again.

Variable-length batching: each sequence's queries are cut into blocks of at most QUERY_BLOCK rows;
a block sees only the keys up to its last row (causal), so about half of a long prefill's score
matrix is never computed. Blocks with the same (rows, key length rounded up to KEY_ROUND) form one
group, computed by one batched matmul with an additive mask for the causal diagonal and the
rounding. The plan (which rows, which cache slots, the masks) depends only on the step's
metadata, so it is built once per step and reused by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import paddle
import paddle.nn.functional as F

from engine.kv_cache import KVCache
from engine.layers.scalars import operand

QUERY_BLOCK = 128  # query rows per block: a long prefill skips the blocks above the causal diagonal
KEY_ROUND = 128  # key lengths are padded (masked) up to a multiple of this, so blocks share a group


@dataclass(frozen=True)
class SequenceSpan:
    """One sequence's part of a step: rows [row_start, row_start + num_tokens) of the batch."""

    row_start: int
    num_tokens: int
    context_len: int  # tokens of this sequence already in the cache before this step
    # [context_len + num_tokens] int64, the cache slots of positions 0..end. Read on the host only (to
    # build the plan), so the runner hands a NumPy array: a tensor per sequence cost a copy in and out.
    slots: np.ndarray | paddle.Tensor


@dataclass(frozen=True)
class DecodeTables:
    """Fixed-shape metadata for attention inside a whole-model decode graph (one token per row)."""

    slots: paddle.Tensor  # [B, S] int64: slots of positions 0..S-1 of each row's sequence (0 past its blocks)
    context_lens: paddle.Tensor  # [B] int64: tokens already cached before this step


@dataclass(frozen=True)
class AttentionMetadata:
    spans: tuple[SequenceSpan, ...]
    slot_mapping: paddle.Tensor  # [num_tokens] int64, the slot each new token's k/v goes to
    num_tokens: int
    decode: DecodeTables | None = None  # only for decode-only steps that replay a whole-model graph

    @cached_property
    def plan(self) -> AttentionPlan:
        """The batched form's groups for this step, built on first use and shared by all layers."""
        return build_plan(self.spans)


@dataclass(frozen=True)
class BlockGroup:
    """G query blocks of `rows` rows each that all see `keys` (padded) key positions."""

    query_rows: np.ndarray  # [G * rows] int64 rows of q
    slots: np.ndarray  # [G, keys] int64 cache slots (padding reads slot 0, masked)
    mask: paddle.Tensor  # [G, rows, keys] float32: 0 visible, -inf not
    rows: int
    keys: int
    rows_in_order: bool = False  # query_rows is 0..G*rows-1: with exactly that many rows, q is the queries
    # tensors made on first use and kept for the step: "queries" (query_rows), and per kv-head count
    # the cache read index
    _indices: dict = field(default_factory=dict, compare=False, repr=False)

    def query_index(self) -> paddle.Tensor:
        """query_rows as a tensor, made on first use (a decode step's groups never need it)."""
        index = self._indices.get("queries")
        if index is None:
            index = self._indices["queries"] = paddle.to_tensor(self.query_rows)
        return index

    def read_index(self, kv_heads: int) -> paddle.Tensor:
        """[Hkv * G * keys] int64 rows of a layer's cache viewed as [slots * Hkv, D], in the order
        [Hkv, G, keys]: one gather reads the group's keys (or values) heads-first and contiguous,
        where a gather of [G*S, Hkv, D] rows then cost a reshape, a transpose, a copy and an unsqueeze
        (the same elements copied to the same places: bitwise the same operand). Built once per step
        and shared by the layers."""
        index = self._indices.get(kv_heads)
        if index is None:
            heads = np.arange(kv_heads, dtype=np.int64)[:, None, None]
            index = paddle.to_tensor((self.slots[None] * kv_heads + heads).reshape(-1))
            self._indices[kv_heads] = index
        return index


@dataclass(frozen=True)
class AttentionPlan:
    groups: tuple[BlockGroup, ...]
    gather: paddle.Tensor | None  # [n] int64: the row of the groups' concatenated output that is token t
    in_order: bool = False  # gather is 0..n-1 (one prefill, a decode step): the output needs no
    # reordering, and gather is None (its tensor was never used)


def build_plan(spans: tuple[SequenceSpan, ...]) -> AttentionPlan:
    """Cut every span into query blocks, group blocks of equal (rows, padded keys), and record where
    each real token's output row lands."""
    blocks: dict[tuple[int, int], list[tuple[SequenceSpan, int, int]]] = {}
    for span in spans:
        for first in range(0, span.num_tokens, QUERY_BLOCK):
            rows = min(QUERY_BLOCK, span.num_tokens - first)
            seen = span.context_len + first + rows  # keys visible to the block's last row
            keys = -(-seen // KEY_ROUND) * KEY_ROUND
            blocks.setdefault((rows, keys), []).append((span, first, seen))
    groups, sources = [], []
    for (rows, keys), members in blocks.items():
        groups.append(_group(members, rows, keys))
        starts = np.asarray([span.row_start + first for span, first, _ in members], dtype=np.int64)
        sources.append((starts[:, None] + np.arange(rows, dtype=np.int64)).reshape(-1))  # token of each output row
    # output row i holds token sources[i]; token t's row is where the sorted sources put it
    order = np.argsort(np.concatenate(sources), kind="stable").astype(np.int64)
    in_order = bool((order == np.arange(order.size)).all())
    return AttentionPlan(tuple(groups), None if in_order else paddle.to_tensor(order), in_order)


def _group(members: list[tuple[SequenceSpan, int, int]], rows: int, keys: int) -> BlockGroup:
    """The group's index tensors and mask, built for all members at once (one broadcast compare for
    the mask instead of a boolean assignment per member: a long prefill's groups are [G, 128, S])."""
    slots = np.zeros((len(members), keys), dtype=np.int64)
    for g, (span, _, seen) in enumerate(members):
        slots[g, :seen] = np.asarray(span.slots)[:seen]
    offsets = np.arange(rows, dtype=np.int64)
    query_rows = np.asarray([span.row_start + first for span, first, _ in members], dtype=np.int64)[:, None] + offsets
    query_pos = np.asarray([span.context_len + first for span, first, _ in members], dtype=np.int64)[:, None] + offsets
    visible = np.arange(keys, dtype=np.int64) <= query_pos[:, :, None]  # [G, rows, keys]
    mask = np.where(visible, np.float32(0.0), np.float32(-np.inf))
    query_rows = query_rows.reshape(-1)
    in_order = bool((query_rows == np.arange(query_rows.size)).all())
    return BlockGroup(query_rows, slots, paddle.to_tensor(mask), rows, keys, in_order)


def paged_attention(layer: int, q: paddle.Tensor, k: paddle.Tensor, v: paddle.Tensor, cache: KVCache,
                    meta: AttentionMetadata, scale: float) -> paddle.Tensor:
    """q [P, Hq, D], k/v [P, Hkv, D] with P >= n real tokens -> [n, Hq * D]; writes k/v to the cache.
    Padded rows (n and beyond) are neither read nor written.

    Heads go first once per layer ([Hq, P, D], one copy) and the groups' outputs stay heads-first
    ([Hq, rows, D]) until one transpose at the end: a per-group transpose of a strided view, and
    matmul operands that were strided views, cost Paddle a slow copy each (a 2048-token prefill: 16
    groups a layer). Pure data movement: the arithmetic, and so every bit, is the same."""
    n = meta.num_tokens
    if k.shape[0] != n:  # padded rows (a replayed piece's): an eager step's k/v are all real, no slice
        k, v = k[:n], v[:n]
    cache.write(layer, meta.slot_mapping, k, v)
    heads, dim = q.shape[1], q.shape[2]
    q = (q * operand(scale, q)).transpose([1, 0, 2]).contiguous()  # [Hq, P, D]: scaling q costs D/S of the scores'
    plan = meta.plan
    parts = [_group_attention(layer, q, cache, group) for group in plan.groups]
    out = paddle.concat(parts, axis=1) if len(parts) > 1 else parts[0]  # [Hq, sum G*rows, D]
    if not plan.in_order:
        out = paddle.index_select(out, plan.gather, axis=1)  # [Hq, n, D]
    return out.transpose([1, 0, 2]).reshape([n, heads * dim])  # [n, Hq * D]


def _group_attention(layer: int, q: paddle.Tensor, cache: KVCache, group: BlockGroup) -> paddle.Tensor:
    """One group: q [Hq, P, D] -> [Hq, G*rows, D]. Query head h reads kv head h // rep (the
    reference's repeat_kv): the rep query heads of a kv head share its keys through a broadcast
    batch dimension, not a copy. Layout [Hkv, rep, G, rows, *] puts the mask's [G, rows, S] last,
    where Paddle's CPU broadcast add runs at the speed of a plain add (a mask broadcast in the
    middle was 3.6x slower). Every matmul operand is contiguous (a strided view made the score
    product 2x slower)."""
    heads, dim = q.shape[0], q.shape[2]
    kv_heads, g = cache.keys[layer].shape[1], group.mask.shape[0]
    if group.rows_in_order and q.shape[1] == g * group.rows:  # every row of q, in order (an eager decode step)
        queries = q
    else:
        queries = paddle.index_select(q, group.query_index(), axis=1)  # [Hq, G*rows, D]
    queries = queries.reshape([kv_heads, heads // kv_heads, g, group.rows, dim])  # [Hkv, rep, G, rows, D]
    # keys stay [.., S, D] and the product reads them transposed: copying them to [.., D, S] first
    # cost more than a decode step's score product (one query row against S keys) itself
    index = group.read_index(kv_heads)
    keys, values = (_heads_first(t, index, g, group.keys, kv_heads, dim)
                    for t in (cache.keys[layer], cache.values[layer]))  # [Hkv, 1, G, S, D]
    scores = paddle.matmul(queries, keys, transpose_y=True)  # [Hkv, rep, G, rows, S]
    mask = group.mask if group.mask.dtype == scores.dtype else group.mask.astype(scores.dtype)  # 0 / -inf: exact
    # in place: the same kernels on the same values (bitwise), without two fresh [.., rows, S] buffers
    # (a 2048-token prefill: 4.0 -> 1.8 ms for the add and softmax of its largest group, one thread)
    probs = F.softmax_(scores.add_(mask), axis=-1)
    out = paddle.matmul(probs, values)  # [Hkv, rep, G, rows, D]
    return out.reshape([heads, g * group.rows, dim])


def _heads_first(buffer: paddle.Tensor, index: paddle.Tensor, g: int, keys: int, kv_heads: int,
                 dim: int) -> paddle.Tensor:
    """A layer's cache buffer [slots, Hkv, D] -> the group's contiguous [Hkv, 1, G, S, D] (one gather)."""
    return paddle.gather(buffer.reshape([-1, dim]), index).reshape([kv_heads, 1, g, keys, dim])


def static_decode_attention(q: paddle.Tensor, k: paddle.Tensor, v: paddle.Tensor, k_cache: paddle.Tensor,
                            v_cache: paddle.Tensor, slots: paddle.Tensor, context_lens: paddle.Tensor,
                            scale: float) -> paddle.Tensor:
    """Decode attention with no data-dependent shape, for capture inside a whole-model graph.

    q [B, Hq, D] and this step's k/v [B, Hkv, D]; row b attends to cached positions
    0..context_lens[b]-1 (read through `slots` [B, S]) and to its own new key at position
    context_lens[b]. The cache is only read: the caller writes the new k/v after the replay.
    Returns [B, Hq * D]. Padded rows (context 0, slots 0) attend to themselves only.
    """
    b, s = slots.shape
    keys = paddle.gather(k_cache, slots.reshape([-1])).reshape([b, s, *k_cache.shape[1:]])  # [B, S, Hkv, D]
    values = paddle.gather(v_cache, slots.reshape([-1])).reshape([b, s, *v_cache.shape[1:]])
    position = paddle.arange(s, dtype="int64").unsqueeze(0)  # [1, S]
    here = (position == context_lens.unsqueeze(1)).unsqueeze(-1).unsqueeze(-1)  # [B, S, 1, 1]
    keys = paddle.where(here, k.unsqueeze(1), keys)
    values = paddle.where(here, v.unsqueeze(1), values)
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        keys, values = paddle.repeat_interleave(keys, rep, axis=2), paddle.repeat_interleave(values, rep, axis=2)
    scores = paddle.matmul(q.unsqueeze(2), keys.transpose([0, 2, 3, 1])) * operand(scale, q)  # [B, Hq, 1, S]
    visible = (position <= context_lens.unsqueeze(1)).unsqueeze(1).unsqueeze(1)  # [B, 1, 1, S]
    scores = paddle.where(visible, scores, paddle.full_like(scores, float("-inf")))
    out = paddle.matmul(F.softmax(scores, axis=-1), values.transpose([0, 2, 1, 3]))  # [B, Hq, 1, D]
    return out.reshape([b, -1])
