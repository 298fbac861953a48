"""`python -m verifier selftest`: the gate proves that it catches every failpoint, and how fast.

A gate is worth the bugs it catches. The engine declares its planted bugs in
`engine/failpoints.py`; this command first runs the gate clean (it must pass: no false alarm),
then runs it once per failpoint with that fault planted (`pytest cases/ --failpoints NAME`) and
records which case caught it first, the seconds from starting pytest to that catch (start-up
included), and hypothesis' minimal example when the catching case is a property. Each run is
stopped at its first catch. A failpoint whose run ends without a catch, or hits the time limit,
survived: the command then exits 1.

A catch is the failed check (call phase) of a case that passed on clean code. A set-up error (a
fixture that could not build its engine), a teardown error, a collection error, or the failure of
a case that did not pass clean is no catch: the case never showed that its check sees the fault.
Such failures are named in the failpoint's note. Which cases passed clean comes from the clean
run, or with `--skip-clean` from that run's gate report (`--clean-report PATH`, the
`--report-json` of the clean gate run just made).

With `--census` each planted run goes to its end instead (no `-x`, hypothesis does not shrink)
and records every failing case: how many independent cases see each bug class
(bench/detector_census.py runs it per failpoint on the case files that can see it).

Order matters for time to detect: each run lists the case files of the fault's area first (the
router cases for a router fault, the 4-rank module for a parallel one), then the rest of the
gate, fast files first, so a fault missed by its own area is still looked for everywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engine.failpoints import KNOWN
from verifier.report import bare_nodeid, read_json

CASES = Path(__file__).resolve().parent.parent / "cases"

# The whole gate, fast and decisive files first; files not listed here run after these.
GATE_ORDER = ("test_router.py", "test_seed_regression.py", "test_config.py", "test_graph_toy.py",
              "test_verifier_compare.py", "test_routing_replay_recorder.py", "test_routing_replay_store.py",
              "test_golden.py", "test_batching.py",
              "test_pieces.py", "test_graph.py", "test_cli.py", "test_loader.py", "test_parallel.py")

# Where a fault of each area is looked for first (a failpoint's area is the part of its name
# before the dot).
AREA_FIRST: dict[str, tuple[str, ...]] = {
    "router": ("test_router.py", "test_seed_regression.py"),
    "moe": ("test_graph.py", "test_seed_regression.py"),
    "attention": ("test_batching.py", "test_golden.py"),
    "rotary": ("test_truth_positions.py", "test_batching.py", "test_graph.py"),
    "kv": ("test_batching.py", "test_graph.py"),
    "graph": ("test_graph_toy.py", "test_graph.py"),
    "dist": ("test_parallel.py", "test_watchdog.py"),
    "norm": ("test_truth_modes.py", "test_second_graph_reference.py"),  # precision, seen against the truths
    "r3": ("test_routing_replay_recorder.py", "test_routing_replay_store.py", "test_routing_replay_engine.py",
           "test_probes_replay.py", "test_routing_replay_ranks.py"),
    "prefix": ("test_prefix_cache.py", "test_prefix_gate.py"),
}

# One failpoint per area for CI's fast run (router, padding, buffers, KV, parallel, routing replay);
# every name must be declared in engine/failpoints.py.
FAST_SUBSET = ("router.bias_absent_crash", "moe.route_padding", "graph.copy_outputs", "kv.slot_off_by_one",
               "dist.skip_allreduce", "r3.record_padding")


@dataclass
class Outcome:
    """What one gate run with `failpoint` planted found ('' = the clean run)."""

    failpoint: str
    bug: str
    caught: bool
    caught_by: str = ""
    seconds: float = 0.0
    example: str = ""
    note: str = ""
    files: list[str] = field(default_factory=list)
    detectors: list[str] = field(default_factory=list)  # census: every failing case (node id)

    def reproduce(self) -> str:
        test = f" '{self.caught_by}'" if self.caught_by else " cases/"
        planted = f" --failpoints {self.failpoint}" if self.failpoint else ""
        return f"python -m pytest{test}{planted}"


def case_files(area: str | None, cases: Path = CASES) -> list[str]:
    """The gate's case files in run order for a fault of `area` (None: the clean order)."""
    present = sorted(p.name for p in cases.glob("test_*.py"))
    first = [f for f in AREA_FIRST.get(area, ()) if f in present] if area else []
    ordered = first + [f for f in GATE_ORDER if f in present and f not in first]
    return ordered + [f for f in present if f not in ordered]


def pytest_command(failpoint: str, events: Path, workers: int, profile: str, cases: Path,
                   files: list[str] | None = None, census: bool = False) -> list[str]:
    """The gate run with `failpoint` planted: on `files` (case file names) or the whole gate in
    area order. No `-x`: a set-up error is no catch and must not end the run; the selftest stops
    the run itself at the first catch (unless `census`)."""
    names = files if files is not None else case_files(failpoint.split(".")[0] if failpoint else None, cases)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "verifier.selftest_events", "--selftest-events",
           str(events), "-n", str(workers), "--hypothesis-profile", profile, "-o", "console_output_style=classic"]
    if failpoint:
        cmd += ["--failpoints", failpoint] + (["--selftest-no-shrink"] if census else [])
    if cases.resolve() == CASES.resolve():
        # The gate's fail-fast order (cases/gate_order.py) would put the four-rank group first on
        # one worker and undo the area-first file order that makes a fault's own cases run first.
        cmd += ["--gate-order", "files"]
    return cmd + [str(cases / f) for f in names]


class _Run:
    """One pytest process and the events file it appends to."""

    def __init__(self, failpoint: str, workdir: Path, workers: int, profile: str, cases: Path,
                 files: list[str] | None = None, census: bool = False):
        self.failpoint = failpoint
        self.census = census
        self.files = list(files or [])
        self.events = workdir / f"{failpoint or 'clean'}.events.jsonl"
        self.log = workdir / f"{failpoint or 'clean'}.log"
        command = pytest_command(failpoint, self.events, workers, profile, cases, files, census)
        self.started = time.monotonic()
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=cases.parent, start_new_session=True)

    def events_so_far(self) -> list[dict]:
        try:
            lines = self.events.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.endswith("}")]

    def stop(self) -> None:
        """End pytest and its xdist workers (one process group: it was started in its own session)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def catches(events: list[dict], clean_passed: frozenset[str] | None) -> list[dict]:
    """The events that are catches: a failed call phase of a case that passed on clean code."""
    return [e for e in events if e["event"] == "failed" and e.get("when") == "call"
            and (clean_passed is None or bare_nodeid(e["nodeid"]) in clean_passed)]


def not_catches(events: list[dict], clean_passed: frozenset[str] | None) -> str:
    """The failures of a run that are no catch, named by kind ('' when there are none)."""
    kinds = {"setup": "set-up error", "teardown": "teardown error"}
    named = []
    for e in events:
        if e["event"] == "collect_error":
            named.append(f"collection error in {e['nodeid']}")
        elif e["event"] == "failed" and e.get("when") != "call":
            named.append(f"{kinds.get(e.get('when'), e.get('when'))} in {e['nodeid']}")
        elif e["event"] == "failed" and clean_passed is not None and bare_nodeid(e["nodeid"]) not in clean_passed:
            named.append(f"{e['nodeid']} failed, but had not passed on clean code")
    shown = "; ".join(dict.fromkeys(named[:5]))
    return f"not catches: {shown}" + (f" (+{len(named) - 5} more)" if len(named) > 5 else "") if named else ""


def _verdict(run: _Run, timeout_s: float, clean_passed: frozenset[str] | None) -> Outcome | None:
    """The outcome of a planted run once it is known, else None (still running)."""
    exit_code = run.proc.poll()  # before reading: a failure written just before exit is then seen
    events = run.events_so_far()
    caught = catches(events, clean_passed)
    elapsed = time.monotonic() - run.started
    bug = KNOWN.get(run.failpoint, "")
    if run.census:
        return _census_verdict(run, events, caught, exit_code, elapsed, timeout_s, clean_passed)
    others = not_catches(events, clean_passed)
    if caught:
        first = caught[0]
        return Outcome(run.failpoint, bug, True, first["nodeid"], round(elapsed, 1), first["example"], others)
    if exit_code is not None and exit_code not in (0, 1):
        return Outcome(run.failpoint, bug, False, seconds=round(elapsed, 1),
                       note=_join(f"the gate could not run (pytest exit {exit_code})", others, f"log {run.log}"))
    if exit_code is not None or any(e["event"] == "finished" for e in events):
        return Outcome(run.failpoint, bug, False, seconds=round(elapsed, 1),
                       note=_join("no check failed with the fault planted", others, f"log {run.log}"))
    if elapsed > timeout_s:
        return Outcome(run.failpoint, bug, False, seconds=round(elapsed, 1),
                       note=_join(f"no check failed within {timeout_s:.0f} s", others, f"log {run.log}"))
    return None


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def _census_verdict(run: _Run, events: list[dict], caught: list[dict], exit_code: int | None, elapsed: float,
                    timeout_s: float, clean_passed: frozenset[str] | None) -> Outcome | None:
    """A census run's outcome once it has ended or hit the time limit (partial then), else None."""
    if exit_code is None and elapsed <= timeout_s:
        return None
    note = ""
    if exit_code is None:
        note = f"stopped at the time limit of {timeout_s:.0f} s: the cases found so far; log {run.log}"
    elif exit_code not in (0, 1):
        note = f"pytest exit {exit_code}; log {run.log}"
    first = caught[0] if caught else {"nodeid": "", "example": ""}
    return Outcome(run.failpoint, KNOWN.get(run.failpoint, ""), bool(caught), first["nodeid"], round(elapsed, 1),
                   first["example"], _join(note, not_catches(events, clean_passed)), run.files,
                   sorted({e["nodeid"] for e in caught}))


def run_planted(names: list[str], jobs: int, workers: int, profile: str, timeout_s: float,
                workdir: Path, cases: Path = CASES, progress=None, files_for=None,
                census: bool = False, clean_passed: frozenset[str] | None = None) -> list[Outcome]:
    """Run the gate once per failpoint, `jobs` runs at a time, each stopped at its first catch
    (with `census`, run to its end). `clean_passed`: the (bare) node ids of the cases that passed
    on clean code, the only ones whose failures are catches (None: the caller vouches that every
    case it runs passes clean; set-up and teardown errors are still no catch). `files_for(name)`:
    the case files to run (None: the gate)."""
    pending, active, done = list(names), [], {}
    try:
        while pending or active:
            while pending and len(active) < jobs:
                name = pending.pop(0)
                files = files_for(name) if files_for else None
                active.append(_Run(name, workdir, workers, profile, cases, files, census))
            time.sleep(0.2)
            for run in list(active):
                outcome = _verdict(run, timeout_s, clean_passed)
                if outcome is not None:
                    run.stop()
                    active.remove(run)
                    done[run.failpoint] = outcome
                    if progress:
                        progress(outcome)
    finally:  # Ctrl-C or an error here: no pytest process group is left running
        for run in active:
            run.stop()
    return [done[name] for name in names]


def run_clean(workers: int, profile: str, workdir: Path, cases: Path = CASES,
              files: list[str] | None = None) -> tuple[Outcome, frozenset[str]]:
    """The whole gate (or these case files) with nothing planted: it must pass. Returns its outcome
    and the (bare) node ids of the cases whose check passed."""
    run = _Run("", workdir, workers, profile, cases, files)
    run.proc.wait()
    events = run.events_so_far()
    failures = [e for e in events if e["event"] in ("failed", "collect_error")]
    passed = frozenset(bare_nodeid(e["nodeid"]) for e in events if e["event"] == "passed")
    elapsed = round(time.monotonic() - run.started, 1)
    if run.proc.returncode == 0 and not failures:
        return Outcome("", "", False, seconds=elapsed, note="clean gate passed"), passed
    first = failures[0]["nodeid"] if failures else f"pytest exit {run.proc.returncode}"
    return Outcome("", "", True, caught_by=first, seconds=elapsed,
                   note=f"FALSE ALARM: the clean gate failed; log {run.log}"), passed


def clean_passed_from_report(path: Path) -> frozenset[str]:
    """The cases that passed in a clean gate run, from its JSON report (`--report-json`).

    Raises UsageError naming the file when it cannot be read, is another schema, or records a
    failpoint or a failure (then it is no clean run)."""
    try:
        report = read_json(path)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UsageError(f"--clean-report {path}: cannot read a gate report ({err})") from None
    if report.failpoints:
        raise UsageError(f"--clean-report {path}: the run planted failpoints {report.failpoints!r}; "
                         "give the report of a clean run")
    if report.verdict() != "pass":
        raise UsageError(f"--clean-report {path}: the clean run's verdict is {report.verdict()!r}, not 'pass'")
    return frozenset(nodeid for nodeid, case in report.cases.items() if case.outcome == "passed")


# ---------------------------------------------------------------------------------------------
# Choosing failpoints, showing and writing the results


class UsageError(ValueError):
    """Arguments the selftest cannot run with: one `error:` line, exit 2."""


def select(only: list[str] | None, fast: bool) -> list[str]:
    """The failpoints to plant (`only` in the order given, else declaration order); unknown names
    are a usage error."""
    wanted = list(only or (FAST_SUBSET if fast else KNOWN))
    unknown = [name for name in wanted if name not in KNOWN]
    if unknown:
        raise UsageError(f"unknown failpoint(s) {', '.join(unknown)}; declared: {', '.join(KNOWN)}")
    return wanted


def summary_rows(outcomes: list[Outcome]) -> list[tuple[str, ...]]:
    rows = []
    for o in outcomes:
        caught = o.caught_by or f"SURVIVED: {o.note}"
        example = o.example if len(o.example) <= EXAMPLE_CHARS else o.example[:EXAMPLE_CHARS] + " ..."
        rows.append((o.failpoint, o.bug, caught, f"{o.seconds:.1f}" if o.caught else "-", example or "-"))
    return rows


EXAMPLE_CHARS = 160  # of a minimal example in the table; the JSON keeps it whole
HEADERS = ("failpoint", "bug class", "caught by (first failing case)", "seconds to detect", "minimal input")


def render_table(outcomes: list[Outcome], console) -> None:
    from rich.table import Table

    table = Table(title="selftest: every planted bug must make the gate fail", show_lines=False)
    for header in HEADERS:
        table.add_column(header, overflow="fold")
    for row in summary_rows(outcomes):
        table.add_row(*row, style="bold red" if row[2].startswith("SURVIVED") else None)
    console.print(table)


def markdown(outcomes: list[Outcome], census: bool = False) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    headers, rows = (CENSUS_HEADERS, census_rows(outcomes)) if census else (HEADERS, summary_rows(outcomes))
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def case_function(nodeid: str) -> str:
    """'cases/test_x.py::test_y[a-b]@group' -> 'cases/test_x.py::test_y': one case, whatever its
    parameters and xdist group."""
    return nodeid.split("[", 1)[0].split("@", 1)[0]


CENSUS_HEADERS = ("failpoint", "detectors (failing cases)", "files", "examples")
CENSUS_EXAMPLES = 4


def census_rows(outcomes: list[Outcome]) -> list[tuple[str, ...]]:
    """Per failpoint: how many distinct cases failed, in how many files, and a few of them."""
    rows = []
    for o in outcomes:
        functions = sorted({case_function(nodeid) for nodeid in o.detectors})
        files = {function.split("::")[0] for function in functions}
        shown = ", ".join(f.rsplit("/", 1)[-1] for f in functions[:CENSUS_EXAMPLES])
        more = f" (+{len(functions) - CENSUS_EXAMPLES} more)" if len(functions) > CENSUS_EXAMPLES else ""
        note = f" ({o.note})" if o.note else ""
        rows.append((o.failpoint, str(len(functions)), str(len(files)), (shown + more or "NONE") + note))
    return rows


def timing_summary(outcomes: list[Outcome]) -> dict:
    times = sorted(o.seconds for o in outcomes if o.caught)
    return {"caught": len(times), "planted": len(outcomes),
            "median_seconds": round(statistics.median(times), 1) if times else None,
            "max_seconds": times[-1] if times else None}


def write_json(path: Path, clean: Outcome | None, outcomes: list[Outcome], settings: dict) -> None:
    document = {"schema": "graphgate-selftest/1", "settings": settings,
                "clean_run": asdict(clean) if clean else None, "summary": timing_summary(outcomes),
                "failpoints": [asdict(o) | {"reproduce": o.reproduce()} for o in outcomes]}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=1))
    os.replace(tmp, path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", nargs="+", metavar="NAME", help="plant only these failpoints")
    parser.add_argument("--fast", action="store_true",
                        help=f"one failpoint per area ({', '.join(FAST_SUBSET)}), for CI")
    parser.add_argument("--skip-clean", action="store_true",
                        help="skip the clean run (when the clean gate has just passed in the same job); "
                             "needs --clean-report")
    parser.add_argument("--clean-report", type=Path, metavar="PATH",
                        help="with --skip-clean: the clean gate run's JSON report (pytest --report-json PATH), "
                             "which says which cases passed on clean code")
    parser.add_argument("--jobs", type=int, default=2, help="planted runs at once (default 2)")
    parser.add_argument("-n", "--workers", type=int, default=0,
                        help="xdist workers per planted run (default 0: in-process, so cases run in the "
                             "order listed; xdist runs large groups first)")
    parser.add_argument("--profile", default="ci", help="hypothesis profile (default ci)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before a run counts as a miss")
    parser.add_argument("--census", action="store_true",
                        help="run each planted gate to its end (no -x, no shrinking) and record every "
                             "failing case: how many cases see each bug")
    parser.add_argument("--files", nargs="+", metavar="FILE",
                        help="run only these case files (names in cases/) in every planted run")
    parser.add_argument("--cases", type=Path, default=CASES, help=argparse.SUPPRESS)  # the selftest's own cases
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results as JSON here")
    parser.add_argument("--markdown", type=Path, metavar="PATH", help="write the table as Markdown here")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 200)
    try:
        names = select(args.only, args.fast)
        if args.jobs < 1 or args.workers < 0:
            raise UsageError("--jobs must be at least 1 and --workers at least 0")
        clean_passed = _clean_passed_given(args)
    except UsageError as err:
        print(f"error: selftest: {err}", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="graphgate-selftest-"))
    clean = None
    if clean_passed is None:
        console.print("clean run of the whole gate (no fault planted) ...")
        clean, clean_passed = run_clean(max(2, args.workers * args.jobs), args.profile, workdir, args.cases,
                                        args.files)
        console.print(f"  {clean.note} in {clean.seconds:.0f} s")
        if clean.caught:
            return 1
    console.print(f"planting {len(names)} failpoint(s), {args.jobs} run(s) at a time; logs in {workdir}")

    def progress(o: Outcome) -> None:
        verdict = f"caught by {o.caught_by} in {o.seconds:.1f} s" if o.caught else f"SURVIVED ({o.note})"
        if args.census:
            verdict = f"{len(o.detectors)} failing case(s) in {o.seconds:.1f} s {o.note}"
        console.print(f"  {o.failpoint}: {verdict}")

    files = (lambda name: args.files) if args.files else None
    outcomes = run_planted(names, args.jobs, args.workers, args.profile, args.timeout, workdir, args.cases,
                           progress, files, args.census, clean_passed=clean_passed)
    render_table(outcomes, console)
    summary = timing_summary(outcomes)
    console.print(f"{summary['caught']}/{summary['planted']} caught; median {summary['median_seconds']} s, "
                  f"slowest {summary['max_seconds']} s")
    settings = {"jobs": args.jobs, "workers": args.workers, "profile": args.profile, "cpus": os.cpu_count(),
                "census": args.census, "files": args.files}
    if args.json:
        write_json(args.json, clean, outcomes, settings)
    if args.markdown:
        args.markdown.write_text(markdown(outcomes, args.census))
    # The plain closing line CI tools read: a planted bug that a case caught counts as passed.
    print(f"selftest: {summary['caught']} passed, {summary['planted'] - summary['caught']} failed")
    return 0 if all(o.caught for o in outcomes) else 1


def _clean_passed_given(args: argparse.Namespace) -> frozenset[str] | None:
    """The clean-passed cases from `--clean-report` with `--skip-clean`; None: make a clean run."""
    if args.clean_report and not args.skip_clean:
        raise UsageError("--clean-report goes with --skip-clean (without it the selftest makes its own clean run)")
    if not args.skip_clean:
        return None
    if args.clean_report is None:
        raise UsageError("--skip-clean needs --clean-report PATH, the JSON report of the clean gate run "
                         "(`python -m pytest cases/ --report-json PATH`): only cases that passed there can catch a fault")
    return clean_passed_from_report(args.clean_report)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m verifier.selftest", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
