"""The effect of the thread count (engine/threads.py) on one GEMM and on the MoE forms.

    nice -n 10 python -m bench.threads_bench

Alternates 1 and `default_threads()` threads in one process (best of `repeat`), so a change in
the machine's load hits both counts alike.
"""

from __future__ import annotations

import json
import time

import numpy as np
import paddle

from bench import moe_forms
from engine.threads import default_threads, set_threads


def gemm_seconds(m: int = 4096, k: int = 1024, n: int = 1024) -> float:
    rng = np.random.default_rng(0)
    a, b = (paddle.to_tensor(rng.standard_normal(s, dtype=np.float32)) for s in ((m, k), (k, n)))
    paddle.matmul(a, b).numpy()
    start = time.perf_counter()
    paddle.matmul(a, b).numpy()
    return time.perf_counter() - start


def measure(repeat: int = 3) -> dict:
    counts = sorted({1, default_threads()})
    best: dict = {}
    for _ in range(repeat):
        for count in counts:
            set_threads(count)
            gemm = gemm_seconds()
            moe = moe_forms.measure(tokens=1024, hidden=512, inter=128, repeat=1)
            for key, value in (("gemm_4096x1024x1024_s", gemm), ("moe_sparse_s", moe["sparse_s"]),
                               ("moe_dense_s", moe["dense_s"])):
                best[(count, key)] = min(best.get((count, key), float("inf")), value)
    set_threads(None)
    return {f"{key}@{count}": value for (count, key), value in best.items()}


if __name__ == "__main__":
    print(json.dumps(measure(), indent=1))
