"""compare A.npz B.npz: two dumps of `python -m engine run --dump` (or of any runtime writing the
format documented in engine/dump.py), compared key by key with the rules of verifier/dumps.py.

A is the run under test, B the reference: routing near-tie margins (`topk_margin_*` keys) are read
from B. Logits use --tolerance: a dtype row of verifier/tolerance.py (default float32), `exact`,
or an explicit pair `RTOL,ATOL`. Token ids and routed experts are always exact: a routing row must
hold k distinct ids in range (else it fails, named by key, row and ids), and a row that differs
from B's is reported apart, not failed, only when B's deciding values admit it under a near-tie.

With --truth T.npz (a float64 dump of the same prompts) the question changes from "is A close to
B?" to "is A as close to the exact answer as B is?" (verifier/truth.py): each float key fails when
A's rel L2 to T exceeds max(TRUTH_RATIO x B's, TRUTH_FLOOR) (verifier/tolerance.py); a token or
expert flip between A and B is noise when T's own margin there is within float32's measured error,
otherwise the side that disagrees with T is named wrong and the comparison fails. --tolerance is
then unused. The report shows both sides' error against T, the verdict in words, and every flip
with the float64 margin that decides it; --json carries the same numbers (`truth` per case).

Exit codes: 0 the dumps agree, 1 they differ (the report names each key, its worst element and its
index), 2 a file is unreadable, not a dump, or the two dumps do not hold the same keys, or the
truth lacks their keys, holds a float key not in float64, or ran other prompts.
"""

from __future__ import annotations

import argparse
import os
import sys
import zipfile
from pathlib import Path

import numpy as np

from verifier.dumps import compare_dumps
from verifier.recording import recording
from verifier.render import render, render_truth
from verifier.report import Case, GateReport
from verifier.tolerance import DEFAULT_TOLERANCES, EXACT, Tolerance
from verifier.truth import judge, record, rows

DUMP_PREFIXES = ("input_ids_p", "logits_p", "greedy_p", "greedy_logits_p", "topk_ids_p", "decode_topk_ids_p")


class DumpError(Exception):
    """A dump that cannot be compared: the message names the file or the keys."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("actual", metavar="A.npz", help="the run under test")
    parser.add_argument("expected", metavar="B.npz", help="the reference run (near-tie margins are read from it)")
    parser.add_argument("--tolerance", default="float32", type=parse_tolerance, metavar="ROW|exact|RTOL,ATOL",
                        help="logits tolerance: a dtype row of verifier/tolerance.py "
                             f"({', '.join(sorted(k for k in DEFAULT_TOLERANCES if k.startswith(('float', 'bfloat'))))}), "
                             "'exact', or 'RTOL,ATOL' (default: float32)")
    parser.add_argument("--truth", metavar="T.npz",
                        help="a float64 dump of the same prompts: judge A and B by their error against it")
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON (schema: verifier/report.py)")


def parse_tolerance(text: str) -> Tolerance:
    """'exact', a dtype row name, or 'rtol,atol'; argparse turns a ValueError into a usage error."""
    if text == "exact":
        return EXACT
    if text in DEFAULT_TOLERANCES:
        return DEFAULT_TOLERANCES[text]
    parts = text.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"--tolerance {text!r}: want a dtype row, 'exact' or 'RTOL,ATOL'")
    try:
        return Tolerance(float(parts[0]), float(parts[1]))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--tolerance {text!r}: {err}") from None


def run(args: argparse.Namespace) -> int:
    try:
        actual, expected = read(args.actual), read(args.expected)
        check_keys(actual, expected, args.actual, args.expected)
        label = f"{args.actual} vs {args.expected}"
        if args.truth:
            case = truth_case(actual, expected, read(args.truth), f"{label} on the truth {args.truth}")
        else:
            case = compare_case(actual, expected, args.tolerance, label)
    except DumpError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = GateReport(command=["compare", args.actual, args.expected] + (["--truth", args.truth] if args.truth else []))
    report.add(case)
    sys.stdout.write(render(report, color=_color()))
    if args.truth and case.outcome == "passed":  # a failed case's panel already holds the table
        sys.stdout.write(render_truth(case, color=_color()))
    if args.json:
        report.write_json(args.json)
    return 0 if case.outcome == "passed" else 1


def read(path: str) -> dict[str, np.ndarray]:
    """All arrays of an .npz, loaded without unpickling; DumpError names the file and the reason."""
    if not Path(path).is_file():
        raise DumpError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DumpError(f"{path}: not a readable .npz dump ({type(err).__name__}: {err})") from None
    if not dump_keys(arrays):
        raise DumpError(f"{path}: holds no dump keys (engine/dump.py: logits_p0, greedy_p0, ...)")
    return arrays


def dump_keys(arrays: dict) -> set[str]:
    return {key for key in arrays if key.startswith(DUMP_PREFIXES)}


def check_keys(actual: dict, expected: dict, actual_path: str, expected_path: str) -> None:
    only_a, only_b = sorted(dump_keys(actual) - dump_keys(expected)), sorted(dump_keys(expected) - dump_keys(actual))
    if only_a or only_b:
        raise DumpError(f"the dumps hold different keys: only in {actual_path}: {only_a[:5]}"
                        f"{' ...' if len(only_a) > 5 else ''}; only in {expected_path}: {only_b[:5]}"
                        f"{' ...' if len(only_b) > 5 else ''}")


def compare_case(actual: dict, expected: dict, tol: Tolerance, label: str) -> Case:
    """Compare under a recording; the Case holds every key's verdict for the report."""
    with recording(keep_failures=None) as recorder:
        try:
            diff = compare_dumps(actual, expected, logits_tol=tol)
        except ValueError as err:  # shapes that differ: not two runs of the same workload
            raise DumpError(str(err)) from None
    comparisons = recorder.to_dict()
    ran = sum(count["ran"] for count in comparisons["counts"].values())
    failed = len(diff.failures())
    return Case(nodeid=label, area="reference", outcome="failed" if failed else "passed",
                message=f"{failed} of {ran} checks differ" if failed else "", comparisons=comparisons)


def truth_case(actual: dict, expected: dict, truth: dict, label: str) -> Case:
    """Judge A against B on the float64 truth; the Case holds every key's verdict and, under
    comparisons["truth"], every float key's errors and every flip with its margin."""
    with recording(keep_failures=None) as recorder:
        try:
            verdict = record(judge(actual, expected, truth))
        except ValueError as err:  # TruthError: keys, dtype, prompts or shapes
            raise DumpError(str(err)) from None
    comparisons = recorder.to_dict() | {"truth": rows(verdict)}
    ran = sum(count["ran"] for count in comparisons["counts"].values())
    failed = len(verdict.failures())
    return Case(nodeid=label, area="reference", outcome="passed" if verdict.passed else "failed",
                message=f"{failed} of {ran} checks fail against the float64 truth" if failed else "",
                comparisons=comparisons)


def _color() -> bool:
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")
