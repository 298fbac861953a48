"""The one way a case starts `python -m engine run` as a process: always with the run's failpoints.

A case that built the command itself could forget `--failpoints`, and then a planted fault never
reaches the process under test (a 2-rank job passed with `dist.skip_allreduce` planted that way).
cases/test_failpoint_reach.py checks that no case file spells the command outside this module.
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

from engine.failpoints import Failpoints

ROOT = Path(__file__).resolve().parent.parent


def engine_run(faults: Failpoints, model: str | Path, *args) -> list[str]:
    """`python -m engine run --model MODEL --failpoints <faults> ARGS...` (every arg str()-ed).
    With --tp N the CLI passes the same arguments, failpoints included, to each of its ranks."""
    return [sys.executable, "-m", "engine", "run", "--model", str(model), "--failpoints", faults.names,
            *map(str, args)]


def engine_main(faults: Failpoints, model: str | Path, *args) -> tuple[int, str, str]:
    """`engine_run`'s command run in this process through engine.__main__.main: the same arguments,
    failpoints included, without a new interpreter paying Paddle's import (2-3 s). For one-rank runs
    whose case is about what the CLI does, not about the process around it. Returns (exit code,
    stdout, stderr)."""
    from engine.__main__ import main

    command = engine_run(faults, model, *args)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(command[command.index("run"):])  # the arguments after `python -m engine`
    return code, out.getvalue(), err.getvalue()


def engine_env() -> dict[str, str]:
    """A minimal environment for the process: this checkout's packages, this interpreter's bin/,
    and nothing else (no ENGINE_* variable of the caller leaks in)."""
    return {"PYTHONPATH": str(ROOT), "PATH": str(Path(sys.executable).parent)}
