"""`python -m bench.piece_forms`: one MoE piece, eager vs a `to_static` program, in two expert forms.

Issue 3's ">= 1.3x from 512 tokens" goal came from one measurement (../shared/PADDLE_CPU.md): a
single MoE piece (o-proj, residual add, RMS norm, sigmoid router with top-k, dense-masked experts,
RMS norm, next qkv-proj; hidden 64, 16 experts, top-4) ran 1.29x faster at 512 tokens and 1.54x at
4096 as a static program than eagerly. This script rebuilds that piece, with its experts in the
form it was measured in (`einsum`: one batched [E, T, 2I] GEMM, a chunk, and an einsum combine)
and in the engine's form (`gemm`: `engine.moe.experts.routed_experts`, three plain GEMMs), and
times eager against static for each, interleaved (eager, static, then static, eager, ...) so that
drift of a shared machine hits both. It reports per-step medians in wall and in process CPU time,
and the quartiles of the per-repetition ratio, since one run's median on this VM can move by 25%.
Both modes must agree bitwise, or the script stops.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.piece_forms", description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 4096], help="step sizes (default 512 4096)")
    parser.add_argument("--reps", type=int, default=20, help="interleaved repetitions per form and size (default 20)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS (default 1, as the reference)")
    parser.add_argument("--serial", action="store_true",
                        help="run each program's ops on the calling thread, as the engine's static backend does "
                             "(default: Paddle's own executor, a thread pool per program)")
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read when Paddle loads its math library
    import paddle

    paddle.set_flags({"FLAGS_eager_delete_tensor_gb": -1.0,  # as the engine's static backend sets it
                      "FLAGS_new_executor_serial_run": args.serial})
    piece = Piece(paddle)
    print(f"{'tokens':>6}  {'form':6}  {'eager ms':>9}  {'static ms':>9}  {'eager cpu':>9}  {'static cpu':>10}"
          f"  ratio (q25..q75)")
    for tokens in args.tokens:
        attn = paddle.randn([tokens, piece.attn_width])
        residual = paddle.randn([tokens, piece.hidden])
        for form in ("einsum", "gemm"):
            eager = piece.forms[form]
            spec = [paddle.static.InputSpec(list(x.shape), "float32") for x in (attn, residual)]
            static = paddle.jit.to_static(eager, input_spec=spec, full_graph=True)
            row = compare(eager, static, (attn, residual), args.reps)
            print(f"{tokens:>6}  {form:6}  {row['eager_ms']:9.2f}  {row['static_ms']:9.2f}  {row['eager_cpu']:9.2f}"
                  f"  {row['static_cpu']:10.2f}  {row['ratio']:.2f} ({row['q25']:.2f}..{row['q75']:.2f})", flush=True)


class Piece:
    """The reference piece's weights (seeded, scaled so the router and norms see ordinary values)
    and its two expert forms, as plain functions of (attn_out [T, 128], residual [T, 64])."""

    hidden, experts, top_k, width, attn_width, qkv_width = 64, 16, 4, 32, 128, 256

    def __init__(self, paddle):
        import numpy as np

        from engine.graph.paddle_compat import convert_load
        from engine.layers.norm import rms_norm
        from engine.moe.experts import routed_experts

        rng = np.random.default_rng(0)
        H, E, K, I = self.hidden, self.experts, self.top_k, self.width

        def weight(*shape):
            return paddle.to_tensor((rng.standard_normal(shape) * 0.05).astype("float32"))

        w = {"o_proj": weight(self.attn_width, H), "norm": weight(H), "router": weight(H, E), "bias": weight(E),
             "qkv": weight(H, self.qkv_width), "gate": weight(H, E * I), "up": weight(H, E * I),
             "down": weight(E * I, H)}  # the engine's layout
        per_expert = [w[name].reshape([H, E, I]).transpose([1, 0, 2]) for name in ("gate", "up")]
        w["gate_up"] = paddle.concat(per_expert, axis=-1)  # [E, H, 2I], the reference's layout
        w["down_e"] = w["down"].reshape([E, I, H])
        F = paddle.nn.functional

        def route(w, h):
            scores = F.sigmoid(paddle.matmul(h, w["router"]))
            ids = paddle.topk(scores + w["bias"], K)[1]
            weights = paddle.take_along_axis(scores, ids, 1)
            return ids, weights / weights.sum(-1, keepdim=True)

        def einsum_experts(w, h, ids, weights):
            hits = (ids.unsqueeze(-1) == paddle.arange(E, dtype=ids.dtype)).astype("float32")
            combine = (hits * weights.unsqueeze(-1)).sum(1)  # [T, E]
            g, u = paddle.chunk(paddle.matmul(h.unsqueeze(0), w["gate_up"]), 2, -1)  # [E, T, I] each
            return paddle.einsum("te,eth->th", combine, paddle.matmul(F.silu(g) * u, w["down_e"]))

        def gemm_experts(w, h, ids, weights):
            return routed_experts(h, ids, weights, E, w["gate"], w["up"], w["down"])

        def around(experts: Callable) -> Callable:
            @paddle.jit.not_to_static
            def body(attn, residual):
                # Weights enter a static program as parameters, as in engine/graph/pieces.py.
                v = {name: convert_load(tensor) for name, tensor in w.items()}
                residual = paddle.matmul(attn, v["o_proj"]) + residual
                h = rms_norm(residual, v["norm"], 1e-5)
                residual = residual + experts(v, h, *route(v, h))
                return paddle.matmul(rms_norm(residual, v["norm"], 1e-5), v["qkv"]), residual

            def piece(attn, residual):
                return body(attn, residual)
            return piece

        self.forms = {"einsum": around(einsum_experts), "gemm": around(gemm_experts)}


def compare(eager: Callable, static: Callable, args: tuple, reps: int) -> dict:
    """Interleaved timings of two callables on the same inputs; checks their first outputs agree."""
    first = {}
    for name, fn in (("eager", eager), ("static", static)):
        fn(*args)  # the static program compiles here
        first[name] = fn(*args)[0].numpy()
    if not (first["eager"] == first["static"]).all():
        raise SystemExit("eager and static results differ: the comparison would not be like for like")
    wall: dict[str, list[float]] = {"eager": [], "static": []}
    cpu: dict[str, list[float]] = {"eager": [], "static": []}
    for rep in range(reps):
        order = (("eager", eager), ("static", static)) if rep % 2 == 0 else (("static", static), ("eager", eager))
        for name, fn in order:
            w, c = time.perf_counter(), time.process_time()
            fn(*args)[0].numpy()  # .numpy() waits for the result
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)
    ratios = sorted(e / s for e, s in zip(wall["eager"], wall["static"]))
    quartiles = statistics.quantiles(ratios, n=4)
    ms = {f"{name}_ms": 1e3 * statistics.median(wall[name]) for name in wall}
    cpu_ms = {f"{name}_cpu": 1e3 * statistics.median(cpu[name]) for name in cpu}
    return {**ms, **cpu_ms, "ratio": statistics.median(ratios), "q25": quartiles[0], "q75": quartiles[2]}


if __name__ == "__main__":
    main()
