"""Paged attention on the fixture's shapes: the batched variable-length form against the previous
per-sequence loop (kept here, verbatim in substance, as the baseline), time and FLOPs per size.

    nice -n 10 python -m bench.attention_forms [--sizes 512 2048 8192] [--repeat 3]

Each size is `tokens / 512` sequences of 512 prompt tokens, one layer, 4 query heads, 2 kv heads,
head_dim 32 (the bundled GLM fixture). FLOPs are the causal minimum: 2 * 2 * Hq * D per visible
(query, key) pair.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import paddle
import paddle.nn.functional as F

from engine.kv_cache import KVCache
from engine.layers import attention as A

HEADS, KV_HEADS, DIM, SEQ = 4, 2, 32, 512


def loop_attention(q, cache: KVCache, meta: A.AttentionMetadata, scale: float) -> paddle.Tensor:
    """The form this replaced: each sequence alone, full [Hq, n, S] scores masked with where."""
    parts = []
    for span in meta.spans:
        queries = q[span.row_start: span.row_start + span.num_tokens]
        k, v = cache.read(0, span.slots)
        rep = queries.shape[1] // k.shape[1]
        k, v = paddle.repeat_interleave(k, rep, axis=1), paddle.repeat_interleave(v, rep, axis=1)
        scores = paddle.matmul(queries.transpose([1, 0, 2]), k.transpose([1, 2, 0])) * scale
        pos = paddle.arange(span.context_len, span.context_len + span.num_tokens, dtype="int64").unsqueeze(1)
        visible = paddle.arange(k.shape[0], dtype="int64").unsqueeze(0) <= pos
        scores = paddle.where(visible.unsqueeze(0), scores, paddle.full_like(scores, float("-inf")))
        parts.append(paddle.matmul(F.softmax(scores, axis=-1), v.transpose([1, 0, 2])).transpose([1, 0, 2]))
    return paddle.concat(parts, axis=0).reshape([meta.num_tokens, -1])


def _step(tokens: int, rng) -> tuple:
    seqs = tokens // SEQ
    cache = KVCache(1, tokens // 16 + 1, 16, KV_HEADS, DIM)
    spans = tuple(A.SequenceSpan(i * SEQ, SEQ, 0, paddle.arange(i * SEQ, (i + 1) * SEQ, dtype="int64"))
                  for i in range(seqs))
    meta = A.AttentionMetadata(spans, paddle.arange(tokens, dtype="int64"), tokens)
    q, k, v = (paddle.to_tensor(rng.standard_normal((tokens, h, DIM), dtype=np.float32))
               for h in (HEADS, KV_HEADS, KV_HEADS))
    return q, k, v, cache, meta


def measure(tokens: int, repeat: int = 3, seed: int = 0) -> dict:
    q, k, v, cache, meta = _step(tokens, np.random.default_rng(seed))
    scale = DIM ** -0.5
    batched = A.paged_attention(0, q, k, v, cache, meta, scale)  # writes the cache, builds the plan
    loop = loop_attention(q, cache, meta, scale)
    best = {"loop": float("inf"), "batched": float("inf")}
    for _ in range(repeat):  # interleaved, so a load change hits both forms alike
        for name, fn in (("loop", lambda: loop_attention(q, cache, meta, scale)),
                         ("batched", lambda: A.paged_attention(0, q, k, v, cache, meta, scale))):
            start = time.perf_counter()
            fn().numpy()
            best[name] = min(best[name], time.perf_counter() - start)
    flops = 4 * HEADS * DIM * (tokens // SEQ) * SEQ * (SEQ + 1) / 2
    diff = np.abs(batched.numpy() - loop.numpy())
    return {"tokens": tokens, "loop_s": best["loop"], "batched_s": best["batched"],
            "speedup": best["loop"] / best["batched"], "causal_gflop": flops / 1e9,
            "loop_gflops": flops / best["loop"] / 1e9, "batched_gflops": flops / best["batched"] / 1e9,
            "max_abs_diff": float(diff.max()), "max_abs_out": float(np.abs(loop.numpy()).max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps([measure(n, args.repeat) for n in args.sizes], indent=1))


if __name__ == "__main__":
    main()
