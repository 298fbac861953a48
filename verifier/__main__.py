"""`python -m verifier VERB ...`: the gate's front door.

Verbs (each has --help):
  gate     run the cases (pytest + xdist) and report; exit 0 pass, 1 divergence, 2 could not run
  compare  two engine dumps (engine/dump.py format) key by key; exit 0 agree, 1 differ, 2 unreadable
  selftest plant each failpoint, prove a case fails, and how fast; exit 1 when a bug survives
  lint-capture  check each captured piece's program for what breaks CUDA graph capture; exit 1 on findings
  lock     regenerate constraints.txt (the exact versions the README installs) in a throwaway venv
  drift    the verifier's own cases on the newest versions the ranges allow; exit 1 when they fail
  merge-reports  join the shard reports of `gate --shard I/N`; exit as the unsharded gate would
  durations  refresh cases/durations.json, which `gate --shard` balances by, from gate reports
  shrink   cut a small checkpoint (same architecture and Hub layout) from a big one; exit 2 on bad input

A verb is a module with `add_arguments(parser)` and `run(args) -> int`, listed in VERBS. Every user error is one `error:` line
on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from typing import Iterable

# verb -> (module, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "gate": ("verifier.cli_gate", "run the gate's cases and print the report"),
    "compare": ("verifier.cli_compare", "compare two engine dumps (.npz) key by key"),
    "selftest": ("verifier.selftest", "plant every failpoint and prove the gate catches it, and how fast"),
    "lint-capture": ("verifier.capture_lint", "check every captured piece for what breaks CUDA graph capture"),
    "lock": ("verifier.cli_lock", "regenerate constraints.txt in a throwaway venv (pip resolves)"),
    "drift": ("verifier.cli_drift", "run the verifier's own cases on the newest allowed versions, vs the lock"),
    "merge-reports": ("verifier.cli_merge", "join a sharded gate's shard reports into one report and verdict"),
    "durations": ("verifier.cli_durations", "refresh cases/durations.json (what shards balance by) from gate reports"),
    "shrink": ("verifier.shrink", "cut a small checkpoint of the same architecture from a big one, lazily"),
}
USAGE_ERROR = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is a single `error: ...` line (CI logs, scripts) and exit 2."""

    def error(self, message: str):
        self.exit(USAGE_ERROR, f"error: {self.prog}: {message} (see --help)\n")


def build_parser(full: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The CLI's parser; `full`: the verbs whose modules are imported for their arguments (None: all).
    The others get their one-line help only, so a run imports just its own verb (some pull in Paddle)."""
    parser = OneLineParser(prog="python -m verifier", description=__doc__.split("\n\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB", parser_class=OneLineParser)
    for verb, (module, summary) in VERBS.items():
        if full is not None and verb not in full:
            verbs.add_parser(verb, help=summary)
            continue
        sub = verbs.add_parser(verb, help=summary, description=importlib.import_module(module).__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        importlib.import_module(module).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse and run one verb; returns the exit code (argparse's own exits become return values)."""
    warnings.filterwarnings("ignore", message="No ccache found")  # Paddle's import-time build notice
    warnings.filterwarnings("ignore", message="Tensor do not have 'place'")  # Paddle, while tracing pieces
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((word for word in argv if not word.startswith("-")), None)  # the verb comes first
    try:
        args = build_parser(full=[chosen] if chosen in VERBS else []).parse_args(argv)
    except SystemExit as stop:  # --help (0) or a usage error (2)
        return int(stop.code or 0)
    return importlib.import_module(VERBS[args.verb][0]).run(args)


if __name__ == "__main__":
    sys.exit(main())
