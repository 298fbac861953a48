"""Which process wrote into a folder, seen by the Python interpreter, not by the code under test.

`install(hook_dir, watched, logs)` writes a `sitecustomize.py` into `hook_dir`; a process started
with `hook_dir` first on PYTHONPATH imports it at start-up (before any project code), and it adds
a CPython audit hook (PEP 578) that notes every write-like event on a path inside `watched`:
an `open` for writing, an `os.rename` / `os.replace` onto it, an `os.mkdir` of it. Each process
appends `rank<TAB>event<TAB>path` lines (rank = its PADDLE_TRAINER_ID, "-" outside a rank) to its
own `logs/<pid>.log`, and first a `start` line, so a rank that wrote nothing is told apart from a
rank the observer never reached. The engine cannot opt out: the interpreter raises these events
for every Python-level file operation, whoever calls it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

HOOK = '''
import os, sys

_WATCHED, _LOGS = {watched!r}, {logs!r}
_RANK = os.environ.get("PADDLE_TRAINER_ID", "-")
_WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _note(event, path):
    line = f"{{_RANK}}\\t{{event}}\\t{{path}}\\n".encode()
    fd = os.open(os.path.join(_LOGS, f"{{os.getpid()}}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _inside(path):
    if isinstance(path, int):
        return None
    path = os.path.abspath(os.fsdecode(path))
    return path if path == _WATCHED or path.startswith(_WATCHED + os.sep) else None


def _hook(event, args):
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \\
                  (isinstance(flags, int) and flags & _WRITING)
        target = _inside(path) if writing else None
    elif event == "os.rename":
        target = _inside(args[1])
    elif event == "os.mkdir":
        target = _inside(args[0])
    else:
        return
    if target is not None:
        _note(event, target)


_note("start", "")
sys.addaudithook(_hook)
'''


@dataclass(frozen=True)
class Write:
    rank: str  # the process's PADDLE_TRAINER_ID, "-" for a process outside the ranks
    event: str  # "open" (for writing), "os.rename" (the path is the destination), "os.mkdir"
    path: Path


def install(hook_dir: Path, watched: Path, logs: Path) -> None:
    """Write the observer into `hook_dir` (put it first on the job's PYTHONPATH); `watched` need
    not exist yet; `logs` is created."""
    hook_dir.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(HOOK.format(watched=str(watched.resolve()), logs=str(logs.resolve())))


def observed(logs: Path) -> tuple[set[str], list[Write]]:
    """(the ranks whose processes ran the observer, every write-like event seen in the folder)."""
    started, writes = set(), []
    for log in sorted(logs.glob("*.log")):
        for line in log.read_text().splitlines():
            rank, event, path = line.split("\t")
            if event == "start":
                started.add(rank)
            else:
                writes.append(Write(rank, event, Path(path)))
    return started, writes
