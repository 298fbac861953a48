"""Causal grouped-query attention over the paged KV cache, one sequence at a time.

This is the op the piecewise graphs are split at: it depends on per-sequence metadata (how many
tokens each sequence already has cached, where its blocks are) and writes the cache, so it runs
eagerly between the captured pieces. Rows of `q` beyond the real tokens (graph padding) are never
read; the output has the real rows only and the graph runner pads it again.
"""

from __future__ import annotations

from dataclasses import dataclass

import paddle
import paddle.nn.functional as F

from engine.kv_cache import KVCache


@dataclass(frozen=True)
class SequenceSpan:
    """One sequence's part of a step: rows [row_start, row_start + num_tokens) of the batch."""

    row_start: int
    num_tokens: int
    context_len: int  # tokens of this sequence already in the cache before this step
    slots: paddle.Tensor  # [context_len + num_tokens] int64, the cache slots of positions 0..end


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


def paged_attention(layer: int, q: paddle.Tensor, k: paddle.Tensor, v: paddle.Tensor, cache: KVCache,
                    meta: AttentionMetadata, scale: float) -> paddle.Tensor:
    """q [P, Hq, D], k/v [P, Hkv, D] with P >= n real tokens -> [n, Hq * D]; writes k/v to the cache.
    Padded rows (n and beyond) are neither read nor written."""
    n = meta.num_tokens
    cache.write(layer, meta.slot_mapping, k[:n], v[:n])
    parts = [_sequence_attention(layer, q, cache, span, scale) for span in meta.spans]
    out = paddle.concat(parts, axis=0) if len(parts) > 1 else parts[0]  # [n, Hq, D]
    return out.reshape([n, -1])


def _sequence_attention(layer: int, q: paddle.Tensor, cache: KVCache, span: SequenceSpan,
                        scale: float) -> paddle.Tensor:
    queries = q[span.row_start: span.row_start + span.num_tokens]  # [n, Hq, D]
    keys, values = cache.read(layer, span.slots)  # [S, Hkv, D]
    return causal_attention(queries, keys, values, span.context_len, scale)


def causal_attention(q: paddle.Tensor, k: paddle.Tensor, v: paddle.Tensor, context_len: int,
                     scale: float) -> paddle.Tensor:
    """q [n, Hq, D] at positions context_len.. ; k/v [S, Hkv, D] at positions 0..S-1 -> [n, Hq, D]."""
    n, heads, s = q.shape[0], q.shape[1], k.shape[0]
    rep = heads // k.shape[1]
    if rep > 1:  # query head h reads kv head h // rep, as the reference's repeat_kv
        k, v = paddle.repeat_interleave(k, rep, axis=1), paddle.repeat_interleave(v, rep, axis=1)
    scores = paddle.matmul(q.transpose([1, 0, 2]), k.transpose([1, 2, 0])) * scale  # [Hq, n, S]
    query_pos = paddle.arange(context_len, context_len + n, dtype="int64").unsqueeze(1)  # [n, 1]
    visible = paddle.arange(s, dtype="int64").unsqueeze(0) <= query_pos  # [n, S]
    scores = paddle.where(visible.unsqueeze(0), scores, paddle.full_like(scores, float("-inf")))
    probs = F.softmax(scores, axis=-1)
    return paddle.matmul(probs, v.transpose([1, 0, 2])).transpose([1, 0, 2])  # [n, Hq, D]


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
    scores = paddle.matmul(q.unsqueeze(2), keys.transpose([0, 2, 3, 1])) * scale  # [B, Hq, 1, S]
    visible = (position <= context_lens.unsqueeze(1)).unsqueeze(1).unsqueeze(1)  # [B, 1, 1, S]
    scores = paddle.where(visible, scores, paddle.full_like(scores, float("-inf")))
    out = paddle.matmul(F.softmax(scores, axis=-1), values.transpose([0, 2, 1, 3]))  # [B, Hq, 1, D]
    return out.reshape([b, -1])
