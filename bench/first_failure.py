"""Seconds from `pytest -n 4 -x cases/ --failpoints NAME` starting to its first failing case, per failpoint.

    python -m bench.first_failure router.bias_in_weights r3.skip_in_graph dist.skip_allreduce
    python -m bench.first_failure --all                          # every failpoint of engine/failpoints.py
    python -m bench.first_failure --order both router.mask_fill_zero   # old order, then new, back to back

One whole-gate run per failpoint (the gate exactly as CI runs it, plus `-x`, `-v` and the failpoint).
The time of the first failure is taken when pytest's `-v` line `[gwN] [ P%] FAILED cases/...` is
read from its output, which xdist prints as soon as the worker reports the case: that is how long a
developer waits for the gate to say "broken". The bench then stops the run (SIGTERM to its session;
the ranks of a 4-rank job end when their launching process is gone): `-x` alone would let a
worker finish the whole xdist group it holds, minutes more. `--keep-going` lets `-x` end it.

A failpoint no case catches within `--timeout` (default 600 s) is recorded as not caught. Times
taken while other work loads the machine are "loaded": the JSON keeps the load averages, and only
runs taken under the same load compare (run `--order xdist` next to the default to compare).
Writes bench/results/first-failure-<machine>-<date>.json and prints a table. Never imported by tests.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.machine import ROOT, cpu_model, git_state, slug

FAILED_LINE = re.compile(r"\[(gw\d+)\] \[\s*\d+%\] (FAILED|ERROR) (\S+)")
STARTED_LINE = re.compile(r"\[(gw\d+)\] \[\s*\d+%\] (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) ")


def stop(proc: subprocess.Popen, grace_s: float = 3.0) -> None:
    """SIGTERM the run's session, then SIGKILL whatever of it is left after `grace_s`: an xdist
    worker (execnet's `exec(eval(...))` bootstrap) has been seen outliving SIGTERM and running cases
    on, which loaded every later run of the bench."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    threading.Timer(grace_s, _kill_session, args=(proc.pid,)).start()


def _kill_session(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_one(failpoint: str, order: str, workers: int, timeout_s: float, log: Path, keep_going: bool) -> dict:
    """One whole-gate run with `failpoint` planted; return when it failed first and how it ended."""
    command = [sys.executable, "-m", "pytest", "-n", str(workers), "-x", "-v", "cases/", "--failpoints", failpoint,
               "--gate-order", order, "-p", "no:cacheprovider"]
    started = time.monotonic()
    first: dict = {}
    finished_cases = 0
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"},
                            start_new_session=True)  # unbuffered: each line is timed when printed
    timer = threading.Timer(timeout_s, stop, args=(proc,))  # our own session only
    timer.start()
    try:
        with log.open("w") as out:
            for line in proc.stdout:
                out.write(line)
                if STARTED_LINE.search(line):
                    finished_cases += 1
                failed = FAILED_LINE.search(line)
                if failed and not first:
                    first = {"seconds": round(time.monotonic() - started, 1), "case": failed.group(3),
                             "worker": failed.group(1), "cases_finished_before": finished_cases - 1}
                    if not keep_going:  # -x would still let a worker finish its xdist group (minutes)
                        stop(proc)
                        # Stop reading: a process of the run may outlive the signal and hold the
                        # pipe open (seen once: an xdist worker, execnet's `exec(eval(...))`
                        # bootstrap, reparented to init), and the loop would wait for an end of
                        # file that never comes.
                        break
        code = proc.wait()
    finally:
        timer.cancel()
    return {"failpoint": failpoint, "caught": bool(first), "first_failure_s": first.get("seconds"),
            "first_failing_case": first.get("case"), "worker": first.get("worker"),
            "cases_finished_before": first.get("cases_finished_before"),
            "run_wall_s": round(time.monotonic() - started, 1), "exit_code": code,
            "stopped_at_first_failure": bool(first) and not keep_going}


def known_failpoints() -> list[str]:
    sys.path.insert(0, str(ROOT))
    from engine.failpoints import KNOWN

    return sorted(KNOWN)


def table(results: list[dict]) -> str:
    lines = ["| failpoint | order | first failure (s) | first failing case | load avg after |", "|---|---|---|---|---|"]
    for r in results:
        seconds = f"{r['first_failure_s']:.1f}" if r["caught"] else "not caught"
        lines.append(f"| {r['failpoint']} | {r['order']} | {seconds} | {r['first_failing_case'] or '-'} | "
                     f"{r['load_average_after'][0]:g} |")
    for order in dict.fromkeys(r["order"] for r in results):
        runs = [r for r in results if r["order"] == order]
        caught = [r["first_failure_s"] for r in runs if r["caught"]]
        if caught:
            lines.append(f"{order}: {len(caught)}/{len(runs)} caught; first failure median "
                         f"{statistics.median(caught):.1f} s, max {max(caught):.1f} s")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("failpoints", nargs="*", help="failpoint names (engine/failpoints.py)")
    parser.add_argument("--all", action="store_true", help="every failpoint of engine/failpoints.py")
    parser.add_argument("--order", choices=("fail-fast", "xdist", "both"), default="fail-fast",
                        help="the gate's order (cases/conftest.py --gate-order); xdist = before issue 22; both = "
                             "each failpoint in the xdist order then at once in the fail-fast order, so the two "
                             "runs of a pair share the machine's load")
    parser.add_argument("-n", "--workers", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before a run is stopped")
    parser.add_argument("--keep-going", action="store_true", help="let -x end the run (a worker first finishes "
                        "its xdist group) instead of stopping it at the first failure")
    parser.add_argument("--note", default="", help="free text stored in the JSON (e.g. 'loaded by 5 other jobs')")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    names = known_failpoints() if args.all else args.failpoints
    if not names:
        parser.error("name failpoints or pass --all")
    unknown = sorted(set(names) - set(known_failpoints()))
    if unknown:
        parser.error(f"not in engine/failpoints.py: {', '.join(unknown)}")
    machine = {"cpu": cpu_model(), "nproc": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
               "load_average_at_start": [round(x, 2) for x in os.getloadavg()], "git": git_state()}
    result = {"started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "note": args.note, "order": args.order,
              "command": f"pytest -n {args.workers} -x -v cases/ --failpoints NAME --gate-order {args.order}",
              "machine": machine, "runs": []}
    stamp = time.strftime("%Y%m%d-%H%M", time.gmtime())
    out = args.out or ROOT / "bench" / "results" / f"first-failure-{slug(machine)}-{stamp}-{args.order}.json"
    logs = Path(tempfile.mkdtemp(prefix="first-failure-"))  # pytest's output of each run, not committed
    orders = ("xdist", "fail-fast") if args.order == "both" else (args.order,)
    for name in names:
        for order in orders:
            run = run_one(name, order, args.workers, args.timeout, logs / f"{name}.{order}.log", args.keep_going)
            run["order"] = order
            run["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
            result["runs"].append(run)
            print(f"{name} ({order} order): first failure {run['first_failure_s']} s ({run['first_failing_case']}), "
                  f"run ended after {run['run_wall_s']} s", flush=True)
        out.write_text(json.dumps(result, indent=1))  # after every run: a long --all keeps what it has
    machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    out.write_text(json.dumps(result, indent=1))
    print(table(result["runs"]))
    print(f"wrote {out} (logs in {logs})")


if __name__ == "__main__":
    main()
