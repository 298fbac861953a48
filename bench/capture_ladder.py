"""Is the whole 4..8192 prefill ladder captured in under 20 s on every run, not only fast ones?

`python -m bench.capture_ladder [--runs 5] [--threads N]` captures the default ladder (58 sizes,
static backend) on the bundled fixture in a fresh process per run, so no run inherits another's
programs, caches or warmed allocator. Each run reports wall and CPU seconds of the capture alone
(weights are loaded before the clock starts); the JSON goes to bench/results/. Never imported by tests.
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

from bench import machine

ROOT = Path(__file__).resolve().parent.parent
GOAL_S = 20.0


def capture_once(threads: int) -> dict:
    """One ladder capture in this process; returns its timings."""
    from bench.measure import BLOCK_SIZE, FIXTURE_DIR, MAX_TOKENS
    from engine.checkpoint.loader import load_weights
    from engine.config import EngineConfig, GraphConfig, default_prefill_sizes
    from engine.hf_config import read_model_config
    from engine.models.moe_decoder import MoEDecoder
    from engine.runner import ModelRunner
    from engine.threads import set_threads

    set_threads(threads)
    cfg = read_model_config(FIXTURE_DIR)
    model = MoEDecoder(cfg, load_weights(FIXTURE_DIR, cfg))
    graph = GraphConfig(mode="piecewise", backend="static", capture="lazy")
    runner = ModelRunner(model, EngineConfig(max_num_batched_tokens=MAX_TOKENS, block_size=BLOCK_SIZE,
                                             num_kv_blocks=64, graph=graph))
    phases = {phase: len(sizes.largest_first()) for phase, sizes in runner.graphs.sizes.items()}
    assert phases.get("prefill") == len(default_prefill_sizes(MAX_TOKENS)), phases
    wall, cpu = time.perf_counter(), time.process_time()
    runner.graphs.capture_all()
    return {"sizes": sum(phases.values()), "sizes_per_phase": phases, "seconds": round(time.perf_counter() - wall, 2),
            "cpu_seconds": round(time.process_time() - cpu, 2), "rss_mib": round(machine.rss_mib())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh processes, one ladder capture each (default 5)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="kernel threads (default: all cores)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(capture_once(args.threads)))
        return
    runs = []
    for i in range(1, args.runs + 1):
        load = os.getloadavg()[0]
        out = subprocess.run([sys.executable, "-m", "bench.capture_ladder", "--child", "--threads", str(args.threads)],
                             cwd=ROOT, capture_output=True, text=True, check=True)
        run = {**json.loads(out.stdout.strip().splitlines()[-1]), "load_before": round(load, 2)}
        runs.append(run)
        print(f"run {i}/{args.runs}: {run['sizes']} sizes in {run['seconds']:.2f} s wall, "
              f"{run['cpu_seconds']:.2f} s CPU, RSS {run['rss_mib']} MiB (load {load:.2f})", file=sys.stderr)
    walls = [r["seconds"] for r in runs]
    summary = {"bench": "capture_ladder", "machine": machine.describe(args.threads), "git": machine.git_state(), "threads": args.threads, "goal_s": GOAL_S,
               "runs": runs, "median_s": statistics.median(walls), "max_s": max(walls),
               "every_run_under_goal": max(walls) < GOAL_S}
    stamp = time.strftime("%Y%m%d-%H%M", time.gmtime())
    path = ROOT / "bench" / "results" / f"capture-ladder-{stamp}.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"ladder capture: median {summary['median_s']:.2f} s, slowest {summary['max_s']:.2f} s over "
          f"{len(runs)} runs; every run < {GOAL_S:.0f} s: {summary['every_run_under_goal']}  ({path})")


if __name__ == "__main__":
    main()
