"""lock: regenerate constraints.txt, the exact versions the README's install commands use.

Creates a throwaway venv, runs `pip install -c START -e ".[schema]"` there (pip resolves; START is
the current lock unless told otherwise), freezes what pip installed and writes it as the lock.
Run it on purpose, to move the lock, then run the gate on the new lock before committing it:
  python -m verifier lock                        re-freeze: the same versions, any new dependency added
  python -m verifier lock --upgrade hypothesis   the newest hypothesis the ranges allow, the rest kept
  python -m verifier lock --newest               the newest of everything (see `verifier drift` first)
  python -m verifier lock --start FREEZE.txt     the versions of a known-good machine (`pip freeze`)
The lock is for the Python it was made with (the header says which); CI uses the same one.

Exit codes: 0 written; 2 could not (pip failed: its last lines are printed, or a bad argument).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from datetime import date
from pathlib import Path

from verifier import venv
from verifier.lockfile import LOCK, canonical, moves, parse_pins, read_pins, render

EXTRAS = "schema"  # the README's second command installs it; goldens and bench are never locked


def add_arguments(parser: argparse.ArgumentParser) -> None:
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--start", metavar="FILE", help="pins to resolve within (default: the current lock)")
    start.add_argument("--newest", action="store_true", help="start from no pins: the newest the ranges allow")
    parser.add_argument("--upgrade", action="append", default=[], metavar="NAME",
                        help="drop NAME's pin from the start, so pip picks its newest allowed version; repeatable")
    parser.add_argument("--pin", action="append", default=[], metavar="NAME==VERSION",
                        help="hold NAME at VERSION (replaces its pin in the start); repeatable")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the venv (default: this one)")
    parser.add_argument("--output", default=str(LOCK), metavar="PATH", help=f"where to write (default {LOCK.name})")


def run(args: argparse.Namespace) -> int:
    try:
        start = start_pins(args)
    except ValueError as error:
        print(f"error: lock: {error}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="graphgate-lock-") as scratch:
        try:
            pins = resolve(Path(scratch), start, args.python)
        except venv.VenvError as error:
            print(f"error: lock: {error}", file=sys.stderr)
            return 2
    old = read_pins(args.output) if Path(args.output).is_file() else {}
    Path(args.output).write_text(render(pins, header(args)))
    for move in moves(old, pins):
        print(f"lock: {move}")
    print(f"lock: wrote {len(pins)} pins to {args.output}")
    return 0


def start_pins(args: argparse.Namespace) -> dict[str, str]:
    """The pins pip resolves within: the start file (or none), minus --upgrade, plus --pin."""
    pins = {} if args.newest else read_pins(args.start or args.output)
    for name in args.upgrade:
        pins.pop(canonical(name), None)
    return pins | parse_pins("\n".join(args.pin), "--pin")


def resolve(scratch: Path, start: dict[str, str], python: str) -> dict[str, str]:
    """What pip installs for the README's second command within `start`, frozen."""
    constraints = scratch / "start.txt"
    constraints.write_text(render(start, []))
    env = venv.create(scratch / "venv", python)
    venv.install(env, EXTRAS, constraints)
    return venv.freeze(env)


def header(args: argparse.Namespace) -> list[str]:
    made_with = " ".join(["python -m verifier lock", *command_words(args)])
    return [
        "Exact versions for the README's installs: pip install -c constraints.txt -e \".[schema]\"",
        "(a pip constraints file: it pins what an install needs and installs nothing by itself).",
        "Every package the gate imports, transitive dependencies included; goldens/bench extras are not locked.",
        f"Made by `{made_with}` on {date.today()} with Python {platform.python_version()} ({sys.platform}).",
        "Do not edit by hand: regenerate with `python -m verifier lock` (see its --help).",
        "",
    ]


def command_words(args: argparse.Namespace) -> list[str]:
    """The lock-shaping arguments, as typed: the header records how the lock was made."""
    words = ["--newest"] if args.newest else ["--start", args.start] if args.start else []
    for name in args.upgrade:
        words += ["--upgrade", name]
    for pin in args.pin:
        words += ["--pin", pin]
    return words
