"""MoE block: the sparse (bucketed, batched-GEMM) form against the dense reference (issue 16).

Real expert shapes from the router on: 128 experts, top-8, GLM grouping (8 groups, keep 4),
`noaux_tc` routing of random hidden states, so the buckets see a router's imbalance rather than a
uniform draw. Reports seconds per call of each form (best of `repeat`), the useful and executed
GFLOP/s, the overflow count, and the agreement (max abs error, relative to the output's scale;
expert ids are shared, they come from one router call).

    nice -n 10 python -m bench.moe_forms [--tokens 4096] [--hidden 1024] [--inter 256]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import paddle

from engine.config import MoEForm
from engine.moe import experts as X
from engine.moe import router


def _weights(rng, experts: int, hidden: int, inter: int):
    def draw(*shape):
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
    return ([draw(inter, hidden) for _ in range(experts)], [draw(inter, hidden) for _ in range(experts)],
            [draw(hidden, inter) for _ in range(experts)])


def _best(fn, repeat: int) -> tuple[float, paddle.Tensor]:
    out, best = fn(), float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        out.numpy()  # wait for the result
        best = min(best, time.perf_counter() - start)
    return best, out


def measure(tokens: int = 4096, hidden: int = 1024, inter: int = 256, experts: int = 128, top_k: int = 8,
            repeat: int = 3, seed: int = 0) -> dict:
    """Time both forms on one routed batch; returns a JSON-ready dict."""
    rng = np.random.default_rng(seed)
    x = paddle.to_tensor(rng.standard_normal((tokens, hidden), dtype=np.float32))
    logits = paddle.matmul(x, paddle.to_tensor(rng.standard_normal((hidden, experts), dtype=np.float32) * 0.05))
    ids, weights = router.noaux_tc(logits, paddle.zeros([experts]), top_k=top_k, n_group=8, topk_group=4,
                                   norm_topk_prob=True, routed_scaling_factor=2.5)
    hub = _weights(rng, experts, hidden, inter)
    result = {"tokens": tokens, "hidden": hidden, "moe_intermediate": inter, "experts": experts, "top_k": top_k,
              "capacity": X.expert_capacity(tokens, top_k, experts),
              "overflow": int(X.overflow_count(ids, experts).item())}
    outs = {}
    for form in MoEForm:
        packed = [paddle.to_tensor(a) for a in X.pack_experts(*hub, form)]
        seconds, outs[form] = _best(lambda: X.routed_experts(x, ids, weights, experts, *packed, form=form), repeat)
        result[f"{form}_s"] = seconds
        del packed
    useful = 2 * 3 * tokens * top_k * hidden * inter
    result["useful_gflop"] = useful / 1e9
    result["speedup"] = result["dense_s"] / result["sparse_s"]
    dense, sparse = outs[MoEForm.DENSE].numpy(), outs[MoEForm.SPARSE].numpy()
    result["max_abs_err"] = float(np.abs(dense - sparse).max())
    result["max_abs_out"] = float(np.abs(dense).max())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--inter", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(measure(args.tokens, args.hidden, args.inter, repeat=args.repeat), indent=1))


if __name__ == "__main__":
    main()
