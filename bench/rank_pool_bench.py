"""How many 4-rank comparisons a minute the gate gets by reusing started ranks, and where a
request's time goes.

    nice -n 10 python -m bench.rank_pool_bench [--requests N] [--sweep-new-tokens 1,4,8,16] [--json PATH]

Starts the 4-rank engine server of cases/test_parallel.py once (wrapped by
bench/timed_engine_server.py, which times each rank's handler and its collectives), then times N
requests per layout and mode on the default prompts (each request is one 4-rank run that a case
compares with a 1-rank run). Prints start-up time, per-request medians, comparisons per minute and
the median split of a request: pick-up (request written -> the last rank's handler starts), the
slowest rank's handler (of which eager collectives), return (the last handler ends -> the client
has every reply). Never imported by tests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from fixtures.pytest_fixtures import default_prompts
from verifier.rank_pool import RankPool

ROOT = Path(__file__).resolve().parent.parent
SERVER = str(ROOT / "bench" / "timed_engine_server.py")
LAYOUTS = {"tp4": (4, 1), "tp4_ep4": (4, 4)}
MODES = ("eager", "piecewise")
GOAL_PER_MIN = 120  # issue 16


def payload(layout: tuple[int, int], mode: str, prompts, new_tokens: int = 8) -> dict:
    graph = {"capture_sizes": [128], "decode_capture_sizes": [4]} if mode != "eager" else {}
    return {"checkpoint": "glm4_moe", "tp": layout[0], "ep": layout[1], "mode": mode, "max_new_tokens": new_tokens,
            "prompts": [list(p.input_ids) for p in prompts], **graph}


def timed_request(pool: RankPool, body: dict) -> dict:
    """One request -> its wall time and the split described in the module docstring (seconds)."""
    sent = time.time()
    replies = pool.request(body)
    done = time.time()
    handler = [r["t_end"] - r["t_start"] for r in replies]
    return {"wall_s": done - sent, "pickup_s": max(r["t_start"] for r in replies) - sent,
            "handler_max_s": max(handler), "handler_min_s": min(handler),
            "handler_cpu_s": [r["handle_cpu_s"] for r in replies],
            "collective_s": max(r["collective_s"] for r in replies), "collectives": replies[0]["collectives"],
            "return_s": done - max(r["t_end"] for r in replies),
            "rank0": {key: value for key, value in replies[0].items() if key.endswith(("_s", "_n"))}}


def summary(runs: list[dict]) -> dict:
    """Medians over the timed requests of one layout and mode."""
    med = {key: statistics.median(r[key] for r in runs)
           for key in ("wall_s", "pickup_s", "handler_max_s", "handler_min_s", "collective_s", "return_s")}
    med["handler_cpu_s_sum"] = statistics.median(sum(r["handler_cpu_s"]) for r in runs)
    med["rank0"] = {key: statistics.median(r["rank0"][key] for r in runs) for key in runs[0]["rank0"]}
    med["collectives"] = runs[0]["collectives"]
    med["per_min"] = 60 / med["wall_s"]
    return med


def sweep_steps(pool: RankPool, prompts, requests: int, new_tokens: list[int]) -> dict:
    """TP4 eager requests generating each count of `new_tokens` (a request runs that many steps):
    median wall per count and the fitted fixed and per-step seconds of a request."""
    walls = {}
    for n in new_tokens:
        body = payload(LAYOUTS["tp4"], "eager", prompts, n)
        walls[n] = statistics.median(timed_request(pool, body)["wall_s"] for _ in range(requests))
    per_step, fixed = np.polyfit(list(walls), list(walls.values()), 1) if len(walls) > 1 else (None, None)
    return {"median_wall_s": walls, "per_step_s": per_step, "fixed_s": fixed}


def measure(requests: int = 10, new_tokens: list[int] | None = None) -> dict:
    """Start the pool, time `requests` warm requests per layout and mode (and, with `new_tokens`,
    the step sweep of `sweep_steps`); the result as data."""
    prompts = default_prompts()
    started = time.monotonic()
    result: dict = {"requests": requests, "goal_per_min": GOAL_PER_MIN, "runs": {}}
    with RankPool([SERVER], 4, failpoints="", env={"PYTHONPATH": str(ROOT)}, start_timeout_s=300, request_timeout_s=300) as pool:
        result["pool_start_s"] = time.monotonic() - started
        for name, layout in LAYOUTS.items():
            for mode in MODES:
                body = payload(layout, mode, prompts)
                first = timed_request(pool, body)  # loads weights, captures graphs
                runs = [timed_request(pool, body) for _ in range(requests)]
                result["runs"][f"{name}-{mode}"] = {"first_s": first["wall_s"], **summary(runs), "each": runs}
        if new_tokens:
            result["steps_sweep"] = sweep_steps(pool, prompts, requests, new_tokens)
    walls = [r["wall_s"] for run in result["runs"].values() for r in run["each"]]
    result["per_min_overall"] = 60 * len(walls) / sum(walls)
    return result


def report(result: dict) -> str:
    lines = [f"pool start: {result['pool_start_s']:.1f} s",
             "| run | first s | median s | per min | pick-up ms | slowest handler s | of which collectives s (n) "
             "| fastest handler s | return ms | handler CPU s, 4 ranks |", "|" + "---|" * 10]
    for name, r in result["runs"].items():
        lines.append(f"| {name} | {r['first_s']:.1f} | {r['wall_s']:.2f} | {r['per_min']:.0f} | "
                     f"{1000 * r['pickup_s']:.0f} | {r['handler_max_s']:.2f} | {r['collective_s']:.2f} "
                     f"({r['collectives']}) | {r['handler_min_s']:.2f} | {1000 * r['return_s']:.0f} | "
                     f"{r['handler_cpu_s_sum']:.2f} |")
    lines += ["", "rank 0, medians per request (eager collectives only; piecewise all-reduces run inside programs):",
              "| run | steps | in steps s | all_reduce n / s | all_gather_last n / s | agree n / s | dump s |",
              "|" + "---|" * 7]
    for name, r in result["runs"].items():
        z = r["rank0"]
        lines.append(f"| {name} | {z['step_n']:.0f} | {z['step_s']:.2f} | "
                     f"{z['all_reduce_n']:.0f} / {z['all_reduce_s']:.2f} | "
                     f"{z['all_gather_last_n']:.0f} / {z['all_gather_last_s']:.2f} | "
                     f"{z['agree_n']:.0f} / {z['agree_s']:.2f} | {z['dump_s']:.3f} |")
    lines.append(f"overall: {result['per_min_overall']:.0f} comparisons/min (goal >= {result['goal_per_min']})")
    sweep = result.get("steps_sweep")
    if sweep and sweep["per_step_s"] is not None:
        walls = ", ".join(f"{n} tokens {s:.2f} s" for n, s in sweep["median_wall_s"].items())
        lines.append(f"tp4 eager by new tokens: {walls}; "
                     f"fit: {sweep['fixed_s']:.2f} s + {sweep['per_step_s']:.3f} s/step")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10, help="timed requests per layout and mode")
    parser.add_argument("--sweep-new-tokens", default="", metavar="N,N,...",
                        help="also time TP4 eager requests generating these token counts (fixed vs per-step cost)")
    parser.add_argument("--json", type=Path, help="also write the result as JSON here")
    args = parser.parse_args()
    result = measure(args.requests, [int(n) for n in args.sweep_new_tokens.split(",") if n])
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
