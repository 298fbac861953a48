"""Predict, without running the gate, what an order of the cases does to `pytest -n 4 cases/`:
the wall time and, per failpoint, when its first detector would finish.

    python -m bench.gate_schedule                       # both orders, the newest gate_bench JSON's times
    python -m bench.gate_schedule --times bench/results/gate-....json --census bench/results/detector-census-....json

A model of xdist's `--dist loadgroup` (xdist 3.x LoadScopeScheduling): the cases are collected in
the order cases/conftest.py gives them (`--gate-order fail-fast`) or xdist's (`--gate-order xdist`:
collection order, scopes re-sorted by size); an xdist group is one scope, every other case a scope
of its own; each worker takes one scope, then one more while it holds at most two unfinished
cases. Case times come from a gate_bench JSON: every case's time when it has them (`cases`), else
the file's mean (older JSONs kept only per-file sums and the 15 slowest). Detectors come from the
selftest's census (which cases fail with each failpoint); a planted bug is assumed to fail its
detector after the case's usual time. Start-up (workers collecting) is not modelled: add it.

A model to choose an order with, not a measurement: bench/first_failure.py measures.
"""

from __future__ import annotations

import argparse
import heapq
import json
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from bench.machine import ROOT

PLUGIN = "bench.collect_groups"


def collect(order: str) -> list[tuple[str, str | None]]:
    """(node id, xdist group or None) of every case, in the order a worker collects them."""
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "cases/", "--gate-order", order,
                          "-p", PLUGIN, "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": str(Path(sys.executable).parent)})
    rows = [json.loads(line[len("GROUP "):]) for line in out.stdout.splitlines() if line.startswith("GROUP ")]
    if not rows:
        raise SystemExit(f"collection printed no cases:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    return [(node, group) for node, group in rows]


def scopes(cases: list[tuple[str, str | None]], reorder: bool) -> list[list[str]]:
    """xdist's work units, in the order it hands them out."""
    units: dict[str, list[str]] = {}
    for node, group in cases:
        units.setdefault(group or node, []).append(node)
    ordered = list(units.values())
    if reorder:  # xdist's default: largest scope first (a stable sort)
        ordered.sort(key=lambda unit: -len(unit))
    return ordered


def case_seconds(times: dict) -> callable:
    gate = times["gate"]
    every = {node.split("@")[0]: entry[0] for node, entry in gate.get("cases", {}).items()}
    slowest = {c["nodeid"].split("@")[0]: c["seconds"] for c in gate.get("slowest_cases", [])}
    mean = {name: f["seconds"] / f["cases"] for name, f in gate["per_file"].items() if f["cases"]}

    def seconds(node: str) -> float:
        if node in every:
            return every[node]
        if node in slowest:
            return slowest[node]
        return mean.get(node.split("::")[0], 0.1)

    return seconds


def simulate(units: list[list[str]], seconds, workers: int) -> tuple[dict[str, float], list[float]]:
    """Finish time of every case, and each worker's end, under the loadgroup hand-out."""
    queue = list(reversed(units))
    pending: dict[int, list[str]] = {w: [] for w in range(workers)}  # the running case first
    ends = [0.0] * workers
    finished: dict[str, float] = {}

    def reschedule(w: int) -> None:  # xdist: one more unit when the worker holds at most two cases
        if queue and len(pending[w]) <= 2:
            pending[w].extend(queue.pop())

    for w in range(workers):  # initial hand-out: one unit each, then topped up once
        if queue:
            pending[w].extend(queue.pop())
    for w in range(workers):
        reschedule(w)
    events = [(seconds(pending[w][0]), w) for w in range(workers) if pending[w]]
    heapq.heapify(events)
    while events:
        now, w = heapq.heappop(events)
        finished[pending[w].pop(0)] = ends[w] = now
        reschedule(w)
        if pending[w]:
            heapq.heappush(events, (now + seconds(pending[w][0]), w))
    return finished, ends


def detection(finished: dict[str, float], census: dict) -> dict[str, float | None]:
    found = {}
    for entry in census["failpoints"]:
        times = [finished[d.split("@")[0]] for d in entry["detectors"] if d.split("@")[0] in finished]
        found[entry["failpoint"]] = min(times) if times else None
    return found


def newest(pattern: str) -> Path:
    paths = sorted((ROOT / "bench" / "results").glob(pattern))
    if not paths:
        raise SystemExit(f"no bench/results/{pattern}")
    return paths[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--times", type=Path, help="a bench/gate_bench.py JSON (default: the newest gate-*.json)")
    parser.add_argument("--census", type=Path, help="the selftest census JSON (default: the newest)")
    parser.add_argument("-n", "--workers", type=int, default=4)
    args = parser.parse_args()
    times = json.loads((args.times or newest("gate-*.json")).read_text())
    census = json.loads((args.census or newest("detector-census-*.json")).read_text())
    seconds = case_seconds(times)
    print(f"case times: {args.times or newest('gate-*.json')} (measured wall {times['gate']['wall_s']:.0f} s)")
    rows = {}
    for order in ("xdist", "fail-fast"):
        finished, ends = simulate(scopes(collect(order), reorder=order == "xdist"), seconds, args.workers)
        rows[order] = (detection(finished, census), max(ends))
    print(f"| failpoint | first detector done, xdist order (s) | fail-fast order (s) |\n|---|---|---|")
    for name in rows["xdist"][0]:
        old, new = rows["xdist"][0][name], rows["fail-fast"][0][name]
        print(f"| {name} | {old if old is None else round(old)} | {new if new is None else round(new)} |")
    for order, (found, wall) in rows.items():
        known = [t for t in found.values() if t is not None]
        print(f"{order}: modelled wall {wall:.0f} s (+ start-up); first detection median {statistics.median(known):.0f} s, "
              f"max {max(known):.0f} s")


if __name__ == "__main__":
    main()
