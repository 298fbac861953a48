"""durations: refresh the durations file the gate's shards are balanced by (verifier/durations.py).

    python -m verifier durations --from REPORT.json [REPORT.json ...] [--out cases/durations.json]

REPORT.json: gate reports (`python -m verifier gate --json ...`, every shard's, or merge-reports'
output). The file is rewritten with exactly their cases' durations: commit it, and the next sharded
runs balance by it. Exit 0 written, 2 a report could not be read (named).
"""

from __future__ import annotations

import argparse
import sys

from verifier import durations


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="reports", nargs="+", required=True, metavar="REPORT",
                        help="gate reports (JSON) to take the durations from")
    parser.add_argument("--out", default=str(durations.DEFAULT_PATH), metavar="PATH",
                        help="the durations file to write (default: the checkout's cases/durations.json)")


def run(args: argparse.Namespace) -> int:
    try:
        recorded = durations.from_reports(args.reports)
    except (OSError, ValueError, KeyError, TypeError) as error:
        print(f"error: durations: {error}", file=sys.stderr)
        return 2
    if not recorded:
        print(f"error: durations: no case with a duration in {', '.join(args.reports)}", file=sys.stderr)
        return 2
    path = durations.write(args.out, recorded)
    print(f"durations: {len(recorded)} cases, {sum(recorded.values()):.1f} s in all -> {path}")
    return 0
