"""Causal grouped-query attention over the paged KV cache, one sequence at a time.

This is the op the piecewise graphs are split at: it depends on per-sequence metadata (how many
tokens each sequence already has cached, where its blocks are) and writes the cache, so it runs
eagerly between the captured pieces. Rows of `q` beyond the real tokens (graph padding) are never
read, and their output rows are zero.
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
class AttentionMetadata:
    spans: tuple[SequenceSpan, ...]
    slot_mapping: paddle.Tensor  # [num_tokens] int64, the slot each new token's k/v goes to
    num_tokens: int


def paged_attention(layer: int, q: paddle.Tensor, k: paddle.Tensor, v: paddle.Tensor, cache: KVCache,
                    meta: AttentionMetadata, scale: float) -> paddle.Tensor:
    """q [P, Hq, D], k/v [P, Hkv, D] with P >= real tokens -> [P, Hq * D]; writes k/v to the cache."""
    n = meta.num_tokens
    cache.write(layer, meta.slot_mapping, k[:n], v[:n])
    parts = [_sequence_attention(layer, q, cache, span, scale) for span in meta.spans]
    out = paddle.concat(parts, axis=0) if len(parts) > 1 else parts[0]  # [n, Hq, D]
    out = out.reshape([n, -1])
    padding = q.shape[0] - n
    return out if padding == 0 else paddle.concat([out, paddle.zeros([padding, out.shape[1]], out.dtype)])


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
