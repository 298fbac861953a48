"""The rank side of a job: every rank starts here, and a pool's ranks serve from here.

This module is the one place that reads the launcher's environment variables in a rank:
  PADDLE_TRAINER_ID     this rank's number (set by paddle.distributed.launch for each worker)
  PADDLE_LOG_DIR        the job's log folder (set by paddle.distributed.launch), for the exit record
  GRAPHGATE_JOB_TOKEN   marks every process of one job, for the clean-up scan (set by lifecycle.py)
  GRAPHGATE_JOB_PARENT  pid of the process that launched the job (set by lifecycle.py)
  GRAPHGATE_POOL_DIR    a pool's request/reply folder (set by the pool; only `serve` needs it)
  GRAPHGATE_POOL_FAILPOINTS  the failpoints a pool's ranks plant (set by the pool; `pool_failpoints`)

`main` first applies the process set-up that needs no Paddle import (engine/threads.py: MKL's AVX2
kernels, large blocks kept; importing Paddle here would, among other things, configure logging
before the program does), then runs the rank's program as `python` would, with a Python stack dump on SIGUSR1
(faulthandler), an exit record `exit.R.json` in the log folder for the parent's blame, and an
exit when the launching process is gone (so a killed test run or CLI leaves no ranks behind).
"""

from __future__ import annotations

import contextlib
import faulthandler
import itertools
import json
import logging
import os
import runpy
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Mapping

from engine.failpoints import Failpoints
from engine.launch import wire
from engine.launch.nodes import is_local_address
from engine.launch.ports import is_listening
from engine.threads import prepare_process

TOKEN_ENV = "GRAPHGATE_JOB_TOKEN"
PARENT_ENV = "GRAPHGATE_JOB_PARENT"
POOL_DIR_ENV = "GRAPHGATE_POOL_DIR"
POOL_FAILPOINTS_ENV = "GRAPHGATE_POOL_FAILPOINTS"
RANK_ENV = "PADDLE_TRAINER_ID"
_LOG_DIR_ENV = "PADDLE_LOG_DIR"
_MASTER_ENV = "PADDLE_MASTER"  # host:port of rank 0's TCP store, set by the launcher
_STORE_WAIT_S = 60.0  # then join anyway: Paddle's own retries and the start-up bound take over
_STORE_POLL_S = 0.01
_PARENT_GONE_EXIT = 70  # EX_SOFTWARE: a rank whose launcher vanished
_CHECKOUT = Path(__file__).resolve().parents[2]
# `python -c` code that starts a rank: the ranks import this checkout's packages, like the parent
# (its root replaces `python -c`'s ''), then `main` runs the program in sys.argv[1:].
ENTRY_CODE = (f"import sys; sys.path[0:1] = [{str(_CHECKOUT)!r}]; "
              "from engine.launch.rank_entry import main; main()")


def exit_record_path(log_dir: Path, rank: int) -> Path:
    return log_dir / f"exit.{rank}.json"


def inside_launched_job() -> bool:
    """True in a worker that paddle.distributed.launch started."""
    return RANK_ENV in os.environ


def this_rank() -> int:
    """This worker's rank (0 outside a launched job)."""
    return int(os.environ.get(RANK_ENV, "0"))


def main() -> None:
    """Each rank's entry point (run as `python -c ENTRY_CODE program args`)."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    _watch_parent()
    prepare_process()
    code, error = 0, ""
    try:
        _run_program(sys.argv[1:])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        raise
    except BaseException as exc:
        code, error = 1, traceback.format_exception_only(exc)[-1].strip()[:300]
        raise
    finally:
        record_exit(code, error)
    _exit_now()


def _exit_now() -> None:
    """End a rank whose program returned: flush what it printed and leave through os._exit.
    Paddle's interpreter tear-down takes 1-3 s of wall time (0.3-0.5 s of CPU) after the last line
    and does nothing a finished rank needs (its files are closed, its peers are done with it), and
    the launcher notices a rank's end only at its next poll after that. Failures keep the normal
    exit: Python prints their traceback on the way out."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


def wait_for_store() -> None:
    """Call right before `paddle.distributed.init_parallel_env()`: a rank other than 0 whose rank 0
    runs on this host waits until rank 0's TCP store listens. Paddle's client, finding the port
    closed, sleeps 3 s before it tries again (tcp_utils.cc), and ranks reach it milliseconds before
    rank 0 opens it in two thirds of the jobs of a gate run (their logs: "Retry to connect ... not
    yet listening"): every such job started 3 s late. Reads the kernel's socket tables (no
    connection); returns at once outside a launched job, on rank 0, for a store on another host,
    where the tables cannot be read, and after _STORE_WAIT_S in any case."""
    host, _, port = os.environ.get(_MASTER_ENV, "").rpartition(":")
    if os.environ.get(RANK_ENV, "0") == "0" or not port.isdigit() or not is_local_address(host):
        return
    deadline = time.monotonic() + _STORE_WAIT_S
    while is_listening(int(port)) is False and time.monotonic() < deadline:
        time.sleep(_STORE_POLL_S)


def serve(handler: Callable[[dict[str, Any]], Mapping[str, Any]]) -> None:
    """Answer a RankPool's requests on this rank until the pool closes; call it after set-up.

    `handler(payload)` returns a dict of numpy arrays and JSON values (reply keys must not start
    with "__"). An exception in `handler` is sent back as this rank's error and serving goes on.
    Only for programs started by a pool (it reads the pool folder from the environment). Before
    the first request it prints the pool's failpoints (`pool_failpoints`) to this rank's log."""
    pool_dir = Path(os.environ[POOL_DIR_ENV])
    rank = int(os.environ[RANK_ENV])
    print(pool_failpoints().announcement(), file=sys.stderr, flush=True)
    wire.write_atomic(wire.ready_path(pool_dir, rank), b"")
    for number in itertools.count():
        payload = wire.decode(wire.wait_for(wire.request_path(pool_dir, number)))
        if payload.get(wire.SHUTDOWN_KEY):
            return
        wire.write_atomic(wire.reply_path(pool_dir, number, rank), _answer(handler, payload))


def pool_failpoints() -> Failpoints:
    """The failpoints the pool that started this rank plants in every engine it builds (the gate
    run's `--failpoints`); a request may add its own. Only in programs started by a pool."""
    return Failpoints.parse(os.environ[POOL_FAILPOINTS_ENV])


def _answer(handler: Callable, payload: dict[str, Any]) -> bytes:
    try:
        return wire.encode(handler(payload))
    except Exception:
        return wire.encode({wire.ERROR_KEY: traceback.format_exc()}, reserved_ok=True)


def _run_program(argv: list[str]) -> None:
    """As `python -m module args` or `python script args` would (sys.path[0], sys.argv)."""
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        sys.path.insert(0, os.getcwd())
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        sys.path.insert(0, str(Path(argv[0]).resolve().parent))
        runpy.run_path(argv[0], run_name="__main__")


def record_exit(code: int, error: str) -> None:
    """Leave {rank, code, time, error} for the parent, which blames the earliest failure (nothing
    outside a launched job). `main` records every rank's end; a rank that ends itself through
    os._exit (the collective watchdog) records first."""
    rank, log_dir = os.environ.get(RANK_ENV), job_log_dir()
    if rank is None or log_dir is None:
        return
    record = {"rank": int(rank), "code": code, "time": time.time(), "error": error}
    wire.write_atomic(exit_record_path(log_dir, int(rank)), json.dumps(record).encode())


def joined_path(log_dir: Path, rank: int) -> Path:
    return log_dir / f"joined.{rank}"


def record_joined() -> None:
    """Leave `joined.R` once this rank has joined the job (init_parallel_env returned, which needs
    every rank of the job): the parent's start-up bound (lifecycle.Launch.wait) waits for these.
    Nothing outside a launched job."""
    rank, log_dir = os.environ.get(RANK_ENV), job_log_dir()
    if rank is not None and log_dir is not None:
        wire.write_atomic(joined_path(log_dir, int(rank)), b"")


def job_log_dir() -> Path | None:
    """The job's log folder (None outside a launched job)."""
    log_dir = os.environ.get(_LOG_DIR_ENV)
    return Path(log_dir) if log_dir else None


def _watch_parent() -> None:
    parent = int(os.environ.get(PARENT_ENV, "0"))
    if parent <= 0:
        return

    def watch() -> None:
        while _pid_alive(parent):
            time.sleep(1.0)
        print(f"engine.launch: parent process {parent} is gone; this rank exits", file=sys.stderr)
        os._exit(_PARENT_GONE_EXIT)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
