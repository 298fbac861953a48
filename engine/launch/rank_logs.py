"""Reading a rank's log: its last lines, and the Python stack faulthandler wrote into it.

A rank's log (Paddle's `workerlog.R`) holds its stdout and stderr, appended to while it runs.
On SIGUSR1 a rank's faulthandler (registered by rank_entry.main) appends a dump that starts, per
thread, with 'Current thread 0x... (most recent call first):' or 'Thread 0x...', then one
'  File "...", line N in name' line per frame, innermost first.
"""

from __future__ import annotations

import re
from pathlib import Path

DUMP_HEADER = "(most recent call first):"
_DUMP_FRAMES = 12  # innermost frames of a rank's main thread shown in an error message
_FRAME_LINE = re.compile(r'\s+File "(.*)", line (\d+) in (\S+)')
_BYTES_PER_LINE = 200  # a guess, only to bound how much of a large log is read for its tail


def tail(path: Path, lines: int, end: int | None = None) -> str:
    """The last `lines` lines of a file, or of its first `end` bytes; '' if it does not exist."""
    end = size(path) if end is None else end
    start = max(0, end - _BYTES_PER_LINE * lines - 4096)
    return "\n".join(read_span(path, start, end).splitlines()[-lines:])


def size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def read_span(path: Path, start: int, end: int | None = None) -> str:
    """Bytes [start, end) of a file (to its end when `end` is None), decoded; '' if missing."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read() if end is None else f.read(max(0, end - start))
    except FileNotFoundError:
        return ""
    return data.decode(errors="replace")


def main_stack(dump: str) -> str:
    """The main thread's part of a dump, cut to its innermost frames (the whole dump if the
    main thread is not found)."""
    block = _main_thread_block(dump) or dump.splitlines()
    more = ["  ..."] if len(block) > _DUMP_FRAMES + 1 else []
    return "\n".join(block[:_DUMP_FRAMES + 1] + more)


def innermost_frame(dump: str) -> str | None:
    """Where the main thread was in a dump: 'at file.py:41 in main' (None without a frame)."""
    block = _main_thread_block(dump)
    frame = _FRAME_LINE.match(block[1]) if len(block) > 1 else None
    return f"at {Path(frame[1]).name}:{frame[2]} in {frame[3]}" if frame else None


def _main_thread_block(dump: str) -> list[str]:
    """The 'Current thread' block of a dump: header, then frames innermost first. (The kernel
    hands a process-directed signal to the main thread unless it blocks it.)"""
    lines = dump.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Current thread ")]
    if not starts:
        return []
    block = [lines[starts[-1]]]
    for line in lines[starts[-1] + 1:]:
        if not line.startswith("  "):
            break
        block.append(line)
    return block
