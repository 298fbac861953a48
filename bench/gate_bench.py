"""The gate's own measurements: wall time of `pytest -n 4 cases/`, graph-vs-eager hypothesis
examples per second per worker, 4-rank comparisons per minute from the warm pool, and what bounds
each.

    nice -n 10 python -m bench.gate_bench                      # the whole gate, then the rank pool
    python -m bench.gate_bench --runs 3 --pool-requests 0      # the README's gate time: median of 3, one line
    python -m bench.gate_bench -n 2 --cases cases/test_graph_toy.py cases/test_config.py --pool-requests 0

One pytest run (`-v`, JUnit XML in the xunit1 family, `--hypothesis-show-statistics`), read back:

* wall time of the run and the CPU seconds of all its processes (workers and the rank jobs they
  started): CPU / wall against the machine's cores says whether the run was CPU-bound;
* per case its time (JUnit: setup + call + teardown) and its worker (`-v`'s `[gwN]` tags); per
  worker the sum, whose maximum against the wall time says whether the slowest worker's share (an
  xdist group runs on one worker) bounds the run; the 15 slowest cases; per file the totals;
* hypothesis' statistics of every case in a graph-vs-eager file (verifier/report.py's areas):
  examples run and seconds spent, so examples per second on the one worker that ran the case;
* then, unless `--pool-requests 0`, bench/rank_pool_bench.py's warm-pool measurement.

With `--runs N` the gate runs N times; the run of median wall time is broken down, every run's
totals are kept, and `quote` is the README's line (median, each run, outcomes, CPU, cores, load
average and machine speed probe at each start, date, commit). Only runs on an idle machine are
the README's figure, and only runs at the same machine speed (`bench/machine_speed.py`) compare.

Writes bench/results/gate-<machine>-<date>.json and prints a summary. Never imported by tests.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

from bench import machine_speed
from bench.machine import ROOT, cpu_model, git_state, slug

WORKER_LINE = re.compile(r"\[(gw\d+)\] \[\s*\d+%\] (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (.+?)\s*$")
STATS_HEAD = re.compile(r"^(\S+::\S+):$")
PHASE = re.compile(r"- during (\w+) phase \(([\d.]+) seconds\)")
EXAMPLES = re.compile(r"(\d+) passing examples?, (\d+) failing examples?, (\d+) invalid examples?")
GRAPH_FILES = ("test_graph.py", "test_graph_toy.py", "test_pieces.py", "test_probes.py", "test_user_model.py",
               "test_moe_forms.py")


def run_gate(cases: list[str], workers: int, folder: Path) -> dict:
    """Run pytest once; return wall and CPU seconds, exit code and the paths of its outputs."""
    junit, log = folder / "junit.xml", folder / "pytest.log"
    command = [sys.executable, "-m", "pytest", "-n", str(workers), *cases, "-v", f"--junitxml={junit}",
               "-o", "junit_family=xunit1", "--hypothesis-show-statistics"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    with log.open("w") as out:
        code = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}).returncode
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"command": " ".join(command[1:]), "exit_code": code, "wall_s": wall, "cpu_s": cpu, "junit": junit,
            "log": log}


def read_cases(junit: Path) -> list[dict]:
    """Every test case in the JUnit XML: node id, file, seconds, outcome."""
    cases = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        path = case.get("file", "")
        cases.append({"nodeid": f"{path}::{case.get('name')}", "file": path, "seconds": float(case.get("time", 0)),
                      "outcome": outcome})
    return cases


def read_workers(log_text: str) -> dict[str, str]:
    """node id -> the xdist worker that ran it, from `-v` lines like `[gw1] [ 12%] PASSED cases/x.py::t`."""
    return {m.group(3): m.group(1) for m in map(WORKER_LINE.search, log_text.splitlines()) if m}  # lines may interleave


def read_hypothesis(log_text: str) -> dict[str, dict]:
    """node id -> {examples, seconds} summed over hypothesis' phases, from its statistics section."""
    stats: dict[str, dict] = {}
    current = None
    for line in log_text.splitlines():
        head = STATS_HEAD.match(line.strip())
        if head:
            current = stats.setdefault(head.group(1), {"examples": 0, "seconds": 0.0, "phases": {}})
            continue
        phase = PHASE.search(line)
        if current is not None and phase:
            current["seconds"] += float(phase.group(2))
            current["phases"][phase.group(1)] = float(phase.group(2))
        counts = EXAMPLES.search(line)
        if current is not None and counts:
            current["examples"] += sum(int(n) for n in counts.groups())
    return stats


def graph_vs_eager(stats: dict[str, dict]) -> dict:
    """Examples per second of the hypothesis cases in the graph-vs-eager files (a case runs on one
    worker, so its rate is a per-worker rate): over all of them, per file, and per case."""
    mine = {node: s for node, s in stats.items() if Path(node.split("::")[0]).name in GRAPH_FILES and s["seconds"]}
    per_case = {node: {**s, "per_s": s["examples"] / s["seconds"]} for node, s in mine.items()}
    per_file: dict[str, dict] = defaultdict(lambda: {"examples": 0, "seconds": 0.0})
    for node, s in mine.items():
        per_file[node.split("::")[0]]["examples"] += s["examples"]
        per_file[node.split("::")[0]]["seconds"] += s["seconds"]
    return {**rate(mine.values()), "cases": len(mine),
            "per_file": {name: {**f, **rate([f])} for name, f in sorted(per_file.items())},
            "median_case_per_s": statistics.median(c["per_s"] for c in per_case.values()) if per_case else None,
            "per_case": dict(sorted(per_case.items(), key=lambda kv: kv[1]["per_s"]))}


def rate(stats) -> dict:
    stats = list(stats)
    examples, seconds = sum(s["examples"] for s in stats), sum(s["seconds"] for s in stats)
    per_s = examples / seconds if seconds else None
    return {"examples": examples, "seconds": seconds, "examples_per_s_per_worker": per_s}


def breakdown(cases: list[dict], workers: dict[str, str], wall: float) -> dict:
    """Per-worker and per-file sums, the 15 slowest cases, and the run's bound, as data."""
    per_worker: dict[str, float] = defaultdict(float)
    per_file: dict[str, dict] = defaultdict(lambda: {"cases": 0, "seconds": 0.0})
    for case in cases:
        case["worker"] = workers.get(case["nodeid"], "?")
        per_worker[case["worker"]] += case["seconds"]
        per_file[case["file"]]["cases"] += 1
        per_file[case["file"]]["seconds"] += case["seconds"]
    per_group: dict[str, float] = defaultdict(float)
    for case in cases:  # loadgroup names a grouped case `...@GROUP`: the group runs serially on one worker
        if "@" in case["nodeid"]:
            per_group[case["nodeid"].rsplit("@", 1)[1]] += case["seconds"]
    files = dict(sorted(per_file.items(), key=lambda kv: -kv[1]["seconds"]))
    slowest = sorted(cases, key=lambda c: -c["seconds"])[:15]
    busiest = max(per_worker.values(), default=0.0)
    return {"per_worker_s": dict(sorted(per_worker.items())), "busiest_worker_share_of_wall": busiest / wall,
            "per_file": files, "per_group_s": dict(sorted(per_group.items(), key=lambda kv: -kv[1])),
            "slowest_cases": slowest,
            "cases": {c["nodeid"]: [round(c["seconds"], 2), c["worker"]] for c in cases},  # every case: s, worker
            "outcomes": {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}}


def bounds(result: dict) -> list[str]:
    """What limits each measurement, read from the numbers (sentences for the summary)."""
    gate, cores = result["gate"], result["machine"]["usable_cpus"]
    busy = gate["cpu_s"] / gate["wall_s"]
    said = [f"gate: CPU {gate['cpu_s']:.0f} s (at least: processes killed before being reaped are missed) over "
            f"{gate['wall_s']:.0f} s wall = {busy:.2f} of {cores} cores busy on average"]
    share = gate["busiest_worker_share_of_wall"]
    if busy > 0.8 * cores:
        said.append("gate: CPU-bound: every core was busy; less work per case (or fewer cases) is the only lever")
    elif share > 0.85:
        said.append(f"gate: the busiest worker was busy {100 * share:.0f}% of the wall time: its serial share "
                    "(an xdist group stays on one worker) bounds the run; split or shorten it")
    else:
        said.append(f"gate: neither CPU-bound nor bound by one worker (busiest {100 * share:.0f}% of the wall): "
                    "start-up, waiting (rank jobs, subprocesses) or other load on the machine (load average "
                    f"{result['machine']['load_average_at_start'][0]} at the start)")
    hyp = result["graph_vs_eager"]
    if hyp["examples_per_s_per_worker"]:
        slowest = next(iter(hyp["per_case"].items()))
        files = ", ".join(f"{Path(name).name} {f['examples_per_s_per_worker']:.1f}/s"
                          for name, f in hyp["per_file"].items())
        said.append(f"graph vs eager: {hyp['examples_per_s_per_worker']:.1f} examples/s per worker over "
                    f"{hyp['cases']} hypothesis cases ({files}); slowest {slowest[0]} at "
                    f"{slowest[1]['per_s']:.2f}/s (an example runs engine steps in two modes, capturing "
                    "new sizes; one kernel thread per worker)")
    pool = result.get("rank_pool")
    if pool:
        worst = max(pool["runs"].items(), key=lambda kv: kv[1]["wall_s"])
        said.append(f"rank pool: {pool['per_min_overall']:.0f} comparisons/min (goal {pool['goal_per_min']}); "
                    f"slowest {worst[0]}: handler {worst[1]['handler_max_s']:.2f} s of {worst[1]['wall_s']:.2f} s, "
                    f"eager collectives {worst[1]['collective_s']:.2f} s, pick-up + return "
                    f"{1000 * (worst[1]['pickup_s'] + worst[1]['return_s']):.0f} ms")
    return said


def quote(result: dict) -> str:
    """One line for the README: the median wall time, every run's, outcomes, machine, date, commit."""
    walls = sorted(r["wall_s"] for r in result["gate_runs"])
    machine, gate = result["machine"], result["gate"]
    commit = (machine.get("git") or {}).get("commit", "?")[:7]
    loads = ", ".join(f"{r['load_average_at_start'][0]:g}" for r in result["gate_runs"])
    speeds = ", ".join(f"{r['machine_speed_s']:g}" for r in result["gate_runs"] if "machine_speed_s" in r)
    return (f"`{result['invocation']}`: {statistics.median(walls):.0f} s "
            f"(median of {len(walls)}: {', '.join(f'{w:.0f}' for w in walls)} s), {gate['outcomes']['passed']} passed, "
            f"{gate['outcomes']['failed']} failed; {machine['cpu']}, {machine['usable_cpus']} cores, load average "
            f"at start {loads}" + (f"; machine speed probe {speeds} s (bench.machine_speed)" if speeds else "")
            + f"; {result['started']}, commit {commit}")


def summary(result: dict) -> str:
    gate = result["gate"]
    workers = ", ".join(f"{w} {s:.1f}" for w, s in gate["per_worker_s"].items())
    lines = [f"gate: {gate['command']}",
             f"exit {gate['exit_code']}, wall {gate['wall_s']:.1f} s, CPU {gate['cpu_s']:.1f} s, "
             f"outcomes {gate['outcomes']}",
             f"per worker (s): {workers}", "slowest cases:"]
    lines += [f"  {c['seconds']:7.2f} s  {c['worker']:4s} {c['nodeid']}" for c in gate["slowest_cases"]]
    lines.append("per file (s, cases):")
    lines += [f"  {f['seconds']:7.1f} s {f['cases']:4d}  {name}" for name, f in list(gate["per_file"].items())[:15]]
    if result.get("rank_pool"):
        from bench.rank_pool_bench import report

        lines.append(report(result["rank_pool"]))
    lines.append("per xdist group (s, serial on one worker): " + ", ".join(
        f"{name} {sec:.1f}" for name, sec in gate["per_group_s"].items()))
    lines += ["bounds:"] + [f"  {s}" for s in result["bounds"]]
    lines.append("quote: " + result["quote"])
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--workers", type=int, default=4, help="xdist workers (default 4, as the gate)")
    parser.add_argument("--cases", nargs="+", default=["cases/"], help="case files or folders (default cases/)")
    parser.add_argument("--pool-requests", type=int, default=10, help="timed warm-pool requests per layout and mode; "
                        "0 skips the pool")
    parser.add_argument("--runs", type=int, default=1, help="whole runs; the median is quoted (the README's "
                        "figure: --runs 3)")
    parser.add_argument("--note", default="", help="free text stored in the JSON (e.g. the machine's load)")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/gate-<machine>-<date>.json)")
    args = parser.parse_args()
    machine = {"cpu": cpu_model(), "nproc": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
               "load_average_at_start": [round(x, 2) for x in os.getloadavg()], "git": git_state()}
    result = {"started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "note": args.note, "machine": machine,
              "invocation": f"pytest -n {args.workers} {' '.join(args.cases)}"}
    runs = []
    for _ in range(args.runs):
        load = [round(x, 2) for x in os.getloadavg()]
        speed = machine_speed.probe()  # this machine's speed drifts within the hour: runs compare only at equal speed
        with tempfile.TemporaryDirectory(prefix="gate-bench-") as tmp:
            run = run_gate(args.cases, args.workers, Path(tmp))
            text = run["log"].read_text()
            cases = read_cases(run["junit"]) if run["junit"].exists() else []
            gate = {k: v for k, v in run.items() if k not in ("junit", "log")}
            gate.update(breakdown(cases, read_workers(text), run["wall_s"]), load_average_at_start=load,
                        machine_speed_s=speed)
            runs.append((gate, text))
    # The run of median wall time is the one broken down; every run's totals are kept.
    gate, text = sorted(runs, key=lambda r: r[0]["wall_s"])[len(runs) // 2]
    result["gate"] = gate
    result["gate_runs"] = [{k: g[k] for k in ("wall_s", "cpu_s", "exit_code", "outcomes", "load_average_at_start",
                                                 "machine_speed_s")}
                           for g, _ in runs]
    result["graph_vs_eager"] = graph_vs_eager(read_hypothesis(text))
    if args.pool_requests > 0:
        from bench.rank_pool_bench import measure

        result["rank_pool"] = measure(args.pool_requests)
    machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["bounds"] = bounds(result)
    result["quote"] = quote(result)
    stamp = time.strftime("%Y%m%d-%H%M", time.gmtime())
    out = args.out or ROOT / "bench" / "results" / f"gate-{slug(machine)}-{stamp}.json"
    out.write_text(json.dumps(result, indent=1))
    print(summary(result))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
