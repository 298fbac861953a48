"""How fast Paddle's CPU GEMM is on MKL's vendor path and on its AVX2 path, on this machine.

Paddle's CPU build links an MKL that dispatches on CPU vendor; on AMD it skips its AVX2 kernels
unless `MKL_DEBUG_CPU_TYPE=5` (engine/threads.py sets it at set-up). This bench measures both paths
in alternating fresh processes (MKL reads the variable once, at its first GEMM), at shapes the
engine runs: a prefill projection, an expert-sized product, a decode row block, and the batched
score product of attention at head_dim 32.

`python -m bench.gemm_paths [--rounds 3] [--threads 2]` prints a table and writes
bench/results/gemm-paths-<date>.json. Never imported by tests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PATHS = {"vendor": None, "avx2": "5"}  # MKL_DEBUG_CPU_TYPE per path; None: unset
SHAPES = {  # name: (batch, m, k, n)
    "prefill projection 8192x512 @ 512x1024": (1, 8192, 512, 1024),
    "expert block 1024x512 @ 512x128 (x64)": (64, 1024, 512, 128),
    "decode rows 16x512 @ 512x1024": (1, 16, 512, 1024),
    "attention scores 512x32 @ 32x512 (x64)": (64, 512, 32, 512),
}


def child(threads: int) -> dict:
    """GFLOP/s per shape in this process (median of 9 after 3 warm-ups)."""
    import paddle

    from engine.graph.paddle_compat import set_kernel_threads

    set_kernel_threads(threads)  # not set_threads: that would choose the MKL path for us
    out = {}
    for name, (batch, m, k, n) in SHAPES.items():
        a = paddle.randn([batch, m, k] if batch > 1 else [m, k])
        b = paddle.randn([batch, k, n] if batch > 1 else [k, n])
        for _ in range(3):
            paddle.matmul(a, b)
        times = []
        for _ in range(9):
            start = time.perf_counter()
            paddle.matmul(a, b)
            times.append(time.perf_counter() - start)
        out[name] = 2 * batch * m * k * n / statistics.median(times) / 1e9
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating process pairs (default 3)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="kernel threads (default: all cores)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.threads)))
        return
    runs: dict[str, list[dict]] = {path: [] for path in PATHS}
    for r in range(args.rounds):
        for path, value in PATHS.items():
            env = {k: v for k, v in os.environ.items() if k != "MKL_DEBUG_CPU_TYPE"}
            if value is not None:
                env["MKL_DEBUG_CPU_TYPE"] = value
            out = subprocess.run([sys.executable, "-m", "bench.gemm_paths", "--child", "--threads", str(args.threads)],
                                 cwd=ROOT, env=env, capture_output=True, text=True, check=True)
            runs[path].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}/{args.rounds} {path}: done (load {os.getloadavg()[0]:.1f})", file=sys.stderr)
    table = {name: {path: round(statistics.median(run[name] for run in runs[path]), 1) for path in PATHS}
             for name in SHAPES}
    print(f"{'GFLOP/s, median of ' + str(args.rounds) + ' processes':45s} {'vendor':>8s} {'avx2':>8s} {'ratio':>6s}")
    for name, row in table.items():
        print(f"{name:45s} {row['vendor']:8.1f} {row['avx2']:8.1f} {row['avx2'] / row['vendor']:6.2f}")
    stamp = time.strftime("%Y%m%d-%H%M", time.gmtime())
    path = ROOT / "bench" / "results" / f"gemm-paths-{stamp}.json"
    path.write_text(json.dumps({"bench": "gemm_paths", "threads": args.threads, "load": os.getloadavg()[0],
                                "gflops": table, "runs": runs}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
