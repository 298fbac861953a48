"""Batched variable-length paged attention against an independent float64 reference.

Steps are drawn as sequences with a cached prefix and new rows (prefill chunks, decodes, long
prefills that cross query blocks and key rounding), grouped-query head ratios 1, 2 and 4, and
scattered cache slots. The reference is a NumPy loop over sequences and heads, written from the
contract (query at position p of a sequence sees that sequence's keys 0..p).
"""

from __future__ import annotations

import numpy as np
import paddle
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import scaled_examples

from engine.kv_cache import KVCache
from engine.layers import attention as A
from verifier.compare import assert_close
from verifier.tolerance import tolerance_for

BLOCK = 16


def reference(q, keys, values, spans, scale) -> np.ndarray:
    """q [n, Hq, D]; keys/values per sequence [S, Hkv, D] (positions 0..S-1) -> [n, Hq * D] float64."""
    out = np.zeros((q.shape[0], q.shape[1], q.shape[2]))
    rep = q.shape[1] // keys[0].shape[1]
    for (row, count, context), k, v in zip(spans, keys, values):
        for t in range(count):
            seen = context + t + 1
            for h in range(q.shape[1]):
                s = (k[:seen, h // rep].astype(np.float64) @ q[row + t, h]) * scale
                p = np.exp(s - s.max())
                out[row + t, h] = (p / p.sum()) @ v[:seen, h // rep]
    return out.reshape(q.shape[0], -1)


@st.composite
def steps(draw):
    lengths = draw(st.lists(st.tuples(st.integers(0, 300), st.integers(1, 300)), min_size=1, max_size=4))
    kv_heads, rep = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2, 4]))
    return lengths, kv_heads, rep, draw(st.integers(0, 2**32 - 1))


@settings(max_examples=scaled_examples(0.6), deadline=None)
@given(step=steps())
def test_batched_paged_attention_matches_the_reference(step):
    lengths, kv_heads, rep, seed = step
    rng, dim = np.random.default_rng(seed), 8
    total = sum(c + n for c, n in lengths)
    cache = KVCache(1, -(-total // BLOCK) + 2, BLOCK, kv_heads, dim)
    free = rng.permutation(cache.keys[0].shape[0])  # scattered slots, as a block table gives
    n = sum(count for _, count in lengths)
    q = rng.standard_normal((n + 3, kv_heads * rep, dim)).astype(np.float32)  # 3 padded rows, never read
    new_k, new_v = (rng.standard_normal((n + 3, kv_heads, dim)).astype(np.float32) for _ in range(2))
    spans, ref_spans, all_k, all_v, new_slots, used, row = [], [], [], [], [], 0, 0
    for context, count in lengths:
        slots = free[used: used + context + count]
        used += context + count
        old_k, old_v = (rng.standard_normal((context, kv_heads, dim)).astype(np.float32) for _ in range(2))
        if context:
            cache.write(0, paddle.to_tensor(slots[:context]), paddle.to_tensor(old_k), paddle.to_tensor(old_v))
        spans.append(A.SequenceSpan(row, count, context, paddle.to_tensor(slots)))
        ref_spans.append((row, count, context))
        all_k.append(np.concatenate([old_k, new_k[row: row + count]]))
        all_v.append(np.concatenate([old_v, new_v[row: row + count]]))
        new_slots.append(slots[context:])
        row += count
    meta = A.AttentionMetadata(tuple(spans), paddle.to_tensor(np.concatenate(new_slots)), n)
    out = A.paged_attention(0, paddle.to_tensor(q), paddle.to_tensor(new_k), paddle.to_tensor(new_v), cache, meta,
                            dim ** -0.5)
    expected = reference(q, all_k, all_v, ref_spans, dim ** -0.5)[:n]
    assert_close(out.numpy(), expected.astype(np.float32), tolerance_for("float32"), name=f"attention {lengths}")
