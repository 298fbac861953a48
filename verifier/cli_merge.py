"""merge-reports: join the JSON reports of a sharded gate's N shards into the unsharded gate's report.

    python -m verifier merge-reports R1.json ... RN.json [--json OUT] [--junitxml OUT] [--html OUT]

Each R is a `python -m verifier gate --shard I/N --json R` report. Prints one report (rich on a
terminal, plain text otherwise or with NO_COLOR, as the gate does), writes the artifacts asked for,
and exits as the unsharded gate would: 1 a case failed (a divergence); 2 a case could not run, or a
report is missing or damaged, or a shard is absent, or a case is missing or duplicated (each named
in the report, verifier/merge.py); 0 only when every case of the collection passed, exactly once.
"""

from __future__ import annotations

import argparse
import os
import sys

from verifier.cli_gate import VERDICT_EXIT
from verifier.junit import write_junit
from verifier.merge import merge
from verifier.render import render, write_html


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("reports", nargs="+", metavar="REPORT", help="the shards' JSON reports, one per shard")
    parser.add_argument("--json", metavar="PATH", help="write the merged report as JSON (schema: verifier/report.py)")
    parser.add_argument("--junitxml", metavar="PATH", help="write the merged report as JUnit XML")
    parser.add_argument("--html", metavar="PATH", help="write the merged report as HTML")


def run(args: argparse.Namespace) -> int:
    report = merge(args.reports)
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    sys.stdout.write(render(report, color=color))
    if args.json:
        report.write_json(args.json)
    if args.junitxml:
        write_junit(report, args.junitxml)
    if args.html:
        write_html(report, args.html)
    return VERDICT_EXIT[report.verdict()]
