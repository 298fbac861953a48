"""drift: the verifier's own cases on the newest versions pyproject's ranges allow, against the lock.

Creates a throwaway venv, runs `pip install -e ".[schema]"` there WITHOUT the lock (pip picks the
newest allowed versions), prints every package that moved versus constraints.txt
("hypothesis 6.155.2 -> 6.170.27"), then runs the verifier's own cases in that venv and names each
one that failed. Drift then reads as "hypothesis moved and example extraction broke", long before
anyone moves the lock; the pre-merge gate keeps running on the lock.

The verifier's own cases are chosen by file name (DRIFT_CASES): cases/test_verifier_*.py (the
compare CLI, dumps, the routing oracles), test_selftest*.py, test_report*.py (report, merge,
oracles) and test_reproduce*.py (reproduce lines, xdist grouping). They exercise the verifier's use
of pytest, xdist, hypothesis, numpy and jsonschema without the engine's slow multi-rank cases.

Exit codes: 0 the cases pass on the newest versions (moved packages are listed all the same);
1 a case failed on them; 2 could not run (venv or pip failed, pytest stopped, no report).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from verifier import venv
from verifier.lockfile import LOCK, ROOT, Move, moves, read_pins
from verifier.report import GateReport, read_json

DRIFT_CASES = ("test_verifier_*.py", "test_selftest*.py", "test_report*.py", "test_reproduce*.py")
EXTRAS = "schema"
PYTEST_TIMEOUT_S = 1800


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", dest="workers", type=int, default=2, metavar="WORKERS",
                        help="xdist workers for the cases (default 2; 0 runs them in one process)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the venv (default: this one)")
    parser.add_argument("--lock", default=str(LOCK), metavar="PATH", help=f"the lock to compare with (default {LOCK.name})")


def drift_cases(cases: Path = ROOT / "cases") -> list[Path]:
    """The verifier's own case files, by DRIFT_CASES, sorted, each once."""
    return sorted({path for pattern in DRIFT_CASES for path in cases.glob(pattern)})


def run(args: argparse.Namespace) -> int:
    try:
        locked = read_pins(args.lock)
    except ValueError as error:
        print(f"error: drift: {error}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="graphgate-drift-") as scratch:
        try:
            env = venv.create(Path(scratch) / "venv", args.python)
            venv.install(env, EXTRAS)
            newest = venv.freeze(env)
        except venv.VenvError as error:
            print(f"error: drift: {error}", file=sys.stderr)
            return 2
        moved = moves(locked, newest)
        _print_moves(moved, args.lock)
        report = run_cases(env, Path(scratch) / "report.json", args.workers)
    return verdict(moved, report)


def run_cases(env: venv.Venv, json_path: Path, workers: int) -> GateReport | None:
    """The drift cases in `env`; their report, or None when pytest stopped without one."""
    files = [str(p) for p in drift_cases()]
    command = [str(env.python), "-m", "pytest", *files, "-q", "--tb=no", "-p", "no:cacheprovider",
               "--report-json", str(json_path), "-n", str(workers)]
    print(f"drift: running {len(files)} case files: {' '.join(Path(f).name for f in files)}", flush=True)
    done = subprocess.run(command, cwd=ROOT, env=env.env(), capture_output=True, text=True, timeout=PYTEST_TIMEOUT_S)
    if done.returncode not in (0, 1) or not json_path.is_file():
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        print(f"error: drift: pytest stopped with exit code {done.returncode}\n{tail}", file=sys.stderr)
        return None
    return read_json(json_path)


def verdict(moved: list[Move], report: GateReport | None) -> int:
    """Print the failed cases next to what moved; the exit code."""
    if report is None:
        return 2
    failed = report.failed()
    for case in failed:
        print(f"drift: FAILED {case.nodeid}: {case.message.splitlines()[0] if case.message else case.outcome}")
    totals = report.totals()
    summary = f"{totals['passed']} passed, {totals['failed']} failed, {totals['error']} errors"
    if not failed:
        print(f"drift: OK on the newest allowed versions ({summary}); {len(moved)} packages moved versus the lock")
        return 0
    what = ", ".join(str(m) for m in moved) or "nothing moved versus the lock"
    print(f"drift: BROKEN: {len(failed)} verifier cases fail on the newest allowed versions ({summary}) "
          f"with: {what}")
    return 1


def _print_moves(moved: list[Move], lock: str) -> None:
    if not moved:
        print(f"drift: every package is at its version in {lock}")
    for move in moved:
        print(f"drift: moved {move}")
