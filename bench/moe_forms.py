"""MoE block: the routed-expert forms against each other (issue 16).

Real expert shapes from the router on: top-8, GLM grouping (8 groups, keep 4), `noaux_tc` routing
of random hidden states with a correction bias drawn U(0, `bias`) per expert (0.5, like the
yardstick checkpoint, makes routing as uneven as a trained bias does; 0 gives a router's natural
imbalance only). Forms, timed interleaved in one process (best of `repeat` each):

  dense         every expert on every row (the reference; E/k times the useful FLOPs)
  capacity      the sparse form at its fixed capacity, as graphs capture it (eager: plus an
                overflow pass sized on the longest bucket)
  exact_loop    the eager sparse form, one GEMM chain per non-empty expert on its exact rows
  exact_padded  the eager sparse form, one batched pass padded to the longest bucket
  sparse        the eager default for moe_form="sparse" (`exact_routed_experts` choosing one of the two)

Reports seconds per call, the useful GFLOP, the overflow count, the longest bucket against the
balanced share, and the agreement (max abs error against the first form, and the output's scale).

    nice -n 10 python -m bench.moe_forms [--tokens 512,2048,8192] [--experts 64,128] [--dense]
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

FORMS = ("dense", "capacity", "exact_loop", "exact_padded", "sparse")


def _weights(rng, experts: int, hidden: int, inter: int):
    def draw(*shape):
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
    return ([draw(inter, hidden) for _ in range(experts)], [draw(inter, hidden) for _ in range(experts)],
            [draw(hidden, inter) for _ in range(experts)])


def _form_fn(form: str, x, ids, weights, experts: int, hub):
    """A no-argument call of `form` on the routed batch, its weights packed once."""
    layout = MoEForm.DENSE if form == "dense" else MoEForm.SPARSE
    packed = [paddle.to_tensor(a) for a in X.pack_experts(*hub, layout)]
    if form in ("dense", "capacity"):
        return lambda: X.routed_experts(x, ids, weights, experts, *packed, form=layout)
    if form == "sparse":
        return lambda: X.routed_experts(x, ids, weights, experts, *packed, form=layout, fixed_shapes=False)
    loop = form == "exact_loop"
    return lambda: X.exact_routed_experts(x, ids, weights, experts, *packed, loop=loop)


def _interleaved(calls: dict, repeat: int) -> tuple[dict, dict]:
    """Best seconds per call of each form, the forms alternating within every repetition."""
    outs = {name: fn().numpy() for name, fn in calls.items()}  # warm-up, and the results
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(repeat):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn().numpy()  # wait for the result
            best[name] = min(best[name], time.perf_counter() - start)
    return best, outs


def measure(tokens: int = 4096, hidden: int = 1024, inter: int = 256, experts: int = 128, top_k: int = 8,
            repeat: int = 3, seed: int = 0, bias: float = 0.0, forms: tuple[str, ...] = FORMS) -> dict:
    """Time `forms` on one routed batch; returns a JSON-ready dict (`<form>_s` per form)."""
    rng = np.random.default_rng(seed)
    x = paddle.to_tensor(rng.standard_normal((tokens, hidden), dtype=np.float32))
    logits = paddle.matmul(x, paddle.to_tensor(rng.standard_normal((hidden, experts), dtype=np.float32) * 0.05))
    correction = paddle.to_tensor(rng.uniform(0, bias, experts).astype(np.float32))
    ids, weights = router.noaux_tc(logits, correction, top_k=top_k, n_group=8, topk_group=4,
                                   norm_topk_prob=True, routed_scaling_factor=2.5)
    counts = np.bincount(ids.numpy().ravel(), minlength=experts)
    hub = _weights(rng, experts, hidden, inter)
    result = {"tokens": tokens, "hidden": hidden, "moe_intermediate": inter, "experts": experts, "top_k": top_k,
              "bias": bias, "capacity": X.expert_capacity(tokens, top_k, experts),
              "longest_bucket": int(counts.max()), "balanced_bucket": tokens * top_k / experts,
              "empty_experts": int((counts == 0).sum()), "auto_picks_loop": bool(X.prefer_loop(counts)),
              "overflow": int(X.overflow_count(ids, experts).item())}
    best, outs = _interleaved({form: _form_fn(form, x, ids, weights, experts, hub) for form in forms}, repeat)
    result.update({f"{form}_s": seconds for form, seconds in best.items()})
    result["useful_gflop"] = 2 * 3 * tokens * top_k * hidden * inter / 1e9
    first = outs[forms[0]]
    result["max_abs_err"] = max(float(np.abs(out - first).max()) for out in outs.values())
    result["max_abs_out"] = float(np.abs(first).max())
    if "dense" in forms:
        result["speedup"] = result["dense_s"] / result["sparse_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="512,2048,8192")
    parser.add_argument("--experts", default="64,128")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--inter", type=int, default=128)
    parser.add_argument("--bias", type=float, default=0.5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dense", action="store_true", help="time the dense form too (slow: E/k x the FLOPs)")
    args = parser.parse_args()
    forms = FORMS if args.dense else FORMS[1:]
    for experts in map(int, args.experts.split(",")):
        for tokens in map(int, args.tokens.split(",")):
            print(json.dumps(measure(tokens, args.hidden, args.inter, experts, repeat=args.repeat, bias=args.bias,
                                     forms=forms)), flush=True)


if __name__ == "__main__":
    main()
