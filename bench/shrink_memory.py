"""`verifier shrink` on a sharded checkpoint larger than the memory it is allowed (issue 26).

Builds a GLM-4.5-Air-shaped big checkpoint (fixtures/big_checkpoint.py; ~1.6 GB in shards of up to
--shard-mb, 512 MiB by default: each larger than the limit) unless DIR already holds one, then runs,
each in its own process:

1. `python -m verifier shrink` under /usr/bin/time -v: its peak resident memory (max RSS);
2. the same under `prlimit --as=LIMIT` (address space: every mapping counts, the mmapped shards
   too), LIMIT well below the checkpoint's size and below one shard's: it must succeed;
3. the naive way under the same limit: safetensors' load_file of every shard into one dict, which
   must fail (the control: the limit is tight enough to matter).

    python -m bench.shrink_memory [--dir /tmp/shrink-bench-big] [--limit-mb 300] [--shard-mb 512]

Prints one markdown table. Never part of the gate (it writes GBs); nothing large is committed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fixtures.big_checkpoint import BigSizes, build_big

AIR_LIKE = BigSizes(hidden=1024, layers=4, dense_layers=1, heads=16, kv_heads=4, head_dim=64, intermediate=2048,
                    moe_intermediate=512, experts=64, top_k=8, n_group=1, topk_group=1)
SHRINK_ARGS = ["--layers", "3", "--experts", "16", "--hidden", "256", "--heads", "8"]
NAIVE = ("import json, sys; from pathlib import Path; from safetensors.numpy import load_file; d = Path(sys.argv[1]); "
         "m = json.loads((d / 'model.safetensors.index.json').read_text())['weight_map']; "
         "t = {}; [t.update(load_file(d / s)) for s in sorted(set(m.values()))]; print(len(t))")


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def run(cmd: list[str], limit_mb: int | None = None) -> tuple[int, float, str]:
    if limit_mb is not None:
        cmd = ["prlimit", f"--as={limit_mb * 2**20}", "--"] + cmd
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return done.returncode, time.perf_counter() - start, done.stdout + done.stderr


def shrink_cmd(big: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "verifier", "shrink", "--model", str(big), "--out", str(out), *SHRINK_ARGS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "shrink-bench-big")
    parser.add_argument("--limit-mb", type=int, default=300)
    parser.add_argument("--shard-mb", type=int, default=512)
    args = parser.parse_args()
    if not (args.dir / "config.json").is_file():
        start = time.perf_counter()
        build_big(args.dir, "glm", "4.x", AIR_LIKE, shard_bytes=args.shard_mb * 2**20)
        print(f"built {args.dir} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    size = checkpoint_bytes(args.dir)
    shards = sorted(f.stat().st_size for f in args.dir.glob("*.safetensors"))
    work = Path(tempfile.mkdtemp(prefix="shrink-bench-"))
    try:
        code, secs, out = run(["/usr/bin/time", "-v"] + shrink_cmd(args.dir, work / "free"))
        peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out)[1])
        limited = run(shrink_cmd(args.dir, work / "limited"), args.limit_mb)
        naive = run([sys.executable, "-c", NAIVE, str(args.dir)], args.limit_mb)
        print(report(args.dir, size, shards, (code, secs, peak_kb), limited, naive, args.limit_mb,
                     checkpoint_bytes(work / "free")))
        print("\n" + "\n".join(line for line in out.splitlines() if not line.startswith("\t")))
    finally:
        shutil.rmtree(work)


def report(big: Path, size: int, shards: list[int], free, limited, naive, limit_mb: int, small: int) -> str:
    mb = 2**20
    rows = [
        f"| checkpoint | {big}: {size / mb:.0f} MiB in {len(shards)} shards (largest {shards[-1] / mb:.0f} MiB); "
        f"shrunk: {small / mb:.1f} MiB |",
        f"| shrink, no limit | exit {free[0]}, {free[1]:.1f} s, peak RSS {free[2] / 1024:.0f} MiB "
        f"({free[2] * 1024 / size:.0%} of the checkpoint) |",
        f"| shrink, prlimit --as={limit_mb} MiB | exit {limited[0]}, {limited[1]:.1f} s |",
        f"| load_file of every shard, same limit | exit {naive[0]}: "
        f"{(naive[2].strip().splitlines() or ['?'])[-1][:90]} |",
    ]
    return "| run | result |\n|---|---|\n" + "\n".join(rows)


if __name__ == "__main__":
    main()
