"""Issue 22, goal 1's floor: what Paddle as the runtime can reach against torch on this machine.

    python -m bench.runtime_floor [--threads 2] [--reps 9]     # about 2 minutes on 2 idle cores

Three measurements, torch and Paddle in one process on the same thread count, interleaved:

1. GEMM GFLOP/s, float32, at the shapes `bench/defaults_yardstick.py`'s model runs (hidden 512,
   qkv 768, MLP 1024, 64 experts of 128, vocabulary 4096): prefill projections at 2048 rows, the
   expert blocks a 2048-token prefill gives each expert (2048 * 8 / 64 = 256 rows), and the decode
   products at 1 and 16 rows. Each is the median of `--reps` calls after 3 warm-ups.
2. Per-op dispatch cost in eager mode: the time of one small op (an add of [1, 512], a
   [1, 512] @ [512, 512] matmul, a [16, 512] add) in a loop of 2000, per call. This is what every
   op of a decode step pays before its kernel does any work.
3. Ops dispatched by one decode step (batch 1 and 16, context 128): the engine's `LLM(ckpt)` with
   its defaults against transformers' default Glm4Moe, both counted as Python -> C++ calls by
   cProfile (Paddle: its `_C_ops` / eager method calls; torch: its C functions), plus torch's
   profiler's count of top-level aten ops. `floor_ms` = ops x the small-op dispatch cost.

From these, the best ratio reachable in eager mode is (engine ops x Paddle dispatch + engine
GEMM time) / (transformers ops x torch dispatch + transformers GEMM time); the JSON records every
number it rests on. Never imported by tests.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import machine
from bench.machine import ROOT

SHAPES = {  # name: (batch, m, k, n)
    "prefill qkv 2048x512 @ 512x768": (1, 2048, 512, 768),
    "prefill mlp 2048x512 @ 512x1024": (1, 2048, 512, 1024),
    "prefill lm head 1x512 @ 512x4096": (1, 1, 512, 4096),
    "expert block 256x512 @ 512x128 (x64)": (64, 256, 512, 128),
    "expert down 256x128 @ 128x512 (x64)": (64, 256, 128, 512),
    "one expert 256x512 @ 512x128": (1, 256, 512, 128),
    "decode 1 row qkv 1x512 @ 512x768": (1, 1, 512, 768),
    "decode 1 row expert 1x512 @ 512x128": (1, 1, 512, 128),
    "decode 16 rows qkv 16x512 @ 512x768": (1, 16, 512, 768),
    "decode 16 rows mlp 16x512 @ 512x1024": (1, 16, 512, 1024),
    "decode 16 rows expert 2x512 @ 512x128": (1, 2, 512, 128),
}
DISPATCH_LOOP = 2000
SETTLE_S = 0.3


def _median_time(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gemm(reps: int) -> dict:
    import paddle
    import torch

    out = {}
    for name, (batch, m, k, n) in SHAPES.items():
        shape_a, shape_b = ([batch, m, k], [batch, k, n]) if batch > 1 else ([m, k], [k, n])
        a, b = np.random.default_rng(0).standard_normal((2, max(batch, 1) * max(m, k) * max(k, n)), dtype=np.float32)
        a = a[:int(np.prod(shape_a))].reshape(shape_a)
        b = b[:int(np.prod(shape_b))].reshape(shape_b)
        pa, pb, ta, tb = paddle.to_tensor(a), paddle.to_tensor(b), torch.from_numpy(a), torch.from_numpy(b)
        flops = 2 * batch * m * k * n
        row = {}
        with torch.inference_mode():
            for side, fn in (("paddle", lambda: paddle.matmul(pa, pb)), ("torch", lambda: torch.matmul(ta, tb)),
                             ("paddle", lambda: paddle.matmul(pa, pb)), ("torch", lambda: torch.matmul(ta, tb))):
                time.sleep(SETTLE_S)
                # a small product takes microseconds: more calls for a steady median
                row.setdefault(side, []).append(_median_time(fn, reps if flops > 1e8 else max(reps, 200)))
        row = {side: min(v) for side, v in row.items()}
        out[name] = {"paddle_gflops": round(flops / row["paddle"] / 1e9, 1),
                     "torch_gflops": round(flops / row["torch"] / 1e9, 1),
                     "paddle_us": round(row["paddle"] * 1e6, 1), "torch_us": round(row["torch"] * 1e6, 1),
                     "paddle_over_torch_time": round(row["paddle"] / row["torch"], 2)}
    return out


def dispatch() -> dict:
    """Microseconds per call of small eager ops, each side's best of 3 loops of DISPATCH_LOOP."""
    import paddle
    import torch

    rng = np.random.default_rng(1)
    x1, x16, w = (rng.standard_normal(s, dtype=np.float32) for s in ((1, 512), (16, 512), (512, 512)))
    p1, p16, pw = paddle.to_tensor(x1), paddle.to_tensor(x16), paddle.to_tensor(w)
    t1, t16, tw = torch.from_numpy(x1), torch.from_numpy(x16), torch.from_numpy(w)
    ops = {"add [1,512]": (lambda: p1 + p1, lambda: t1 + t1),
           "add [16,512]": (lambda: p16 + p16, lambda: t16 + t16),
           "matmul [1,512]@[512,512]": (lambda: paddle.matmul(p1, pw), lambda: torch.matmul(t1, tw)),
           "reshape [16,512]->[16,4,128]": (lambda: p16.reshape([16, 4, 128]), lambda: t16.reshape(16, 4, 128)),
           "slice [16,512][:, :128]": (lambda: p16[:, :128], lambda: t16[:, :128])}
    out = {}
    with torch.inference_mode():
        for name, (pf, tf) in ops.items():
            best = {}
            for _ in range(3):
                for side, fn in (("paddle", pf), ("torch", tf)):
                    time.sleep(0.05)
                    start = time.perf_counter()
                    for _ in range(DISPATCH_LOOP):
                        fn()
                    best[side] = min(best.get(side, 1e9), (time.perf_counter() - start) / DISPATCH_LOOP)
            out[name] = {"paddle_us": round(best["paddle"] * 1e6, 2), "torch_us": round(best["torch"] * 1e6, 2),
                         "paddle_over_torch": round(best["paddle"] / best["torch"], 2)}
    return out


CHAIN_OPS = 100  # ops in `_chain`: 50 multiply-adds


def _chain(x):
    """50 multiply-adds of a small tensor: 100 ops whose kernels cost next to nothing."""
    for _ in range(50):
        x = x * 1.0001 + x
    return x


def static_dispatch() -> dict:
    """Microseconds per op of `_chain` on [1, 512]: Paddle eager, the same function as one
    `paddle.jit.to_static(full_graph=True)` program (what a whole-step decode graph replays), and
    torch eager. Best of 3 loops of 300 calls each."""
    import paddle
    import torch

    x, t = paddle.rand([1, 512]), torch.rand(1, 512)
    program = paddle.jit.to_static(_chain, full_graph=True)
    program(x)
    sides = {"paddle_eager": lambda: _chain(x), "paddle_static": lambda: program(x), "torch_eager": lambda: _chain(t)}
    best = {}
    with torch.inference_mode():
        for _ in range(3):
            for side, fn in sides.items():
                for _ in range(20):
                    fn()
                start = time.perf_counter()
                for _ in range(300):
                    fn()
                best[side] = min(best.get(side, 1e9), (time.perf_counter() - start) / 300 / CHAIN_OPS)
    return {f"{side}_us_per_op": round(v * 1e6, 2) for side, v in best.items()}


def _c_calls(stats: pstats.Stats, steps: int, library: str) -> tuple[float, dict[str, float]]:
    """Calls per step of `library`'s built-in (C) functions and tensor methods, the Python -> C++
    dispatches (builtins such as isinstance are left out); the top ones by count."""
    per = {}
    for (file, _, func), (_, ncalls, *_rest) in stats.stats.items():
        if file == "~" and (library in func or "'Tensor' objects" in func or "TensorBase' objects" in func):
            per[func] = per.get(func, 0) + ncalls / steps
    top = dict(sorted(per.items(), key=lambda kv: -kv[1])[:25])
    return sum(per.values()), {k: round(v, 1) for k, v in top.items()}


def _all_calls(stats: pstats.Stats) -> int:
    """Every function call cProfile saw (Python and C): the interpreter work a step costs."""
    return sum(ncalls for _, ncalls, *_rest in stats.stats.values())


def op_counts(llm, hf, batch: int, steps: int = 4) -> dict:
    """Dispatches per decode step on both sides (context 128), cProfile and torch.profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench.hf_yardstick import ARCH, engine_steps, hf_prefill

    ids = np.random.default_rng(2).integers(0, ARCH["vocab_size"], (batch, 128))
    result = {}
    # engine: profile only the decode steps (engine_steps times each; profile the whole run, then the
    # prefill alone, and subtract)
    def engine_calls(new: int) -> pstats.Stats:
        prof = cProfile.Profile()
        prof.enable()
        engine_steps(llm, ids, new)
        prof.disable()
        return pstats.Stats(prof)

    engine_steps(llm, ids, steps + 1)  # warm
    with_decode, prefill_only = engine_calls(steps + 1), engine_calls(1)
    total_d, top_d = _c_calls(with_decode, 1, "paddle")
    total_p, top_p = _c_calls(prefill_only, 1, "paddle")
    result["engine_c_calls_per_step"] = round((total_d - total_p) / steps, 1)
    result["engine_all_calls_per_step"] = round((_all_calls(with_decode) - _all_calls(prefill_only)) / steps)
    result["engine_top_calls_per_step"] = {k: round((v - top_p.get(k, 0)) / steps, 1) for k, v in top_d.items()}
    # transformers: one decode step after a prefill
    with torch.inference_mode():
        logits, cache = hf_prefill(hf, ids)
        token = torch.from_numpy(logits[:, -1].argmax(-1)[:, None].astype(np.int64))
        hf(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1)  # warm
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(steps):
            hf(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1)
        prof.disable()
        total, top = _c_calls(pstats.Stats(prof), steps, "torch")
        result["hf_c_calls_per_step"] = round(total, 1)
        result["hf_all_calls_per_step"] = round(_all_calls(pstats.Stats(prof)) / steps)
        result["hf_top_calls_per_step"] = top
        with profile(activities=[ProfilerActivity.CPU]) as tp:
            hf(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1)
        events = [e for e in tp.events() if e.name.startswith("aten::")]
        inner = {id(c) for e in events for c in e.cpu_children}
        result["hf_top_level_aten_ops_per_step"] = sum(1 for e in events if id(e) not in inner)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--note", default="")
    parser.add_argument("--skip-ops", action="store_true", help="GEMM and dispatch only (no checkpoint)")
    parser.add_argument("--ops-only", action="store_true",
                        help="op counts only: deterministic, so meaningful on a loaded machine too")
    args = parser.parse_args()
    import torch

    from engine.threads import set_threads

    set_threads(args.threads)
    torch.set_num_threads(args.threads)
    out = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "machine": machine.describe(args.threads),
           "torch": torch.__version__, "note": args.note}
    out["gemm"] = {} if args.ops_only else gemm(args.reps)
    for name, row in out["gemm"].items():
        print(f"{name:42s} paddle {row['paddle_gflops']:7.1f} GFLOP/s ({row['paddle_us']:8.1f} us)  torch "
              f"{row['torch_gflops']:7.1f} ({row['torch_us']:8.1f} us)  paddle/torch time {row['paddle_over_torch_time']:.2f}",
              flush=True)
    out["dispatch"] = {} if args.ops_only else dispatch()
    for name, row in out["dispatch"].items():
        print(f"dispatch {name:32s} paddle {row['paddle_us']:6.2f} us  torch {row['torch_us']:6.2f} us  "
              f"ratio {row['paddle_over_torch']:.2f}", flush=True)
    out["static_dispatch"] = {} if args.ops_only else static_dispatch()
    print("ops of a 100-op chain on [1, 512], us per op:", out["static_dispatch"], flush=True)
    if not args.skip_ops:
        from bench.defaults_yardstick import PREFILL_TOKENS
        from bench.hf_yardstick import build_checkpoint, load_hf
        from engine.llm import LLM

        tmp = Path(tempfile.mkdtemp(prefix="runtime-floor-"))
        try:
            build_checkpoint(tmp, 64, max_positions=max(PREFILL_TOKENS) + 64)
            llm, hf = LLM(tmp), load_hf(tmp, None)
            out["ops"] = {f"batch {b}": op_counts(llm, hf, b) for b in (1, 16)}
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(json.dumps(out["ops"], indent=1))
    out["load_average_end"] = [round(x, 2) for x in __import__("os").getloadavg()]
    path = ROOT / "bench" / "results" / f"runtime-floor-{machine.slug(out['machine'])}-{time.strftime('%Y%m%d-%H%M', time.gmtime())}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
