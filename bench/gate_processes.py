"""Where the gate's CPU goes, process by process: every process a `pytest -n 4 cases/` run starts
(xdist workers, `python -m engine run` jobs, rank processes, nested pytest runs, tools), with its
CPU seconds and its command line, grouped by kind.

    python -m bench.gate_processes                       # the whole gate
    python -m bench.gate_processes --cases cases/test_launch.py -n 2
    python -m bench.gate_processes --total-only --cases cases/test_launch.py -n 2   # any user, concurrent runs

`--total-only` needs no root and may run while other measurements run: the bench process becomes
the child subreaper of everything the run starts (prctl PR_SET_CHILD_SUBREAPER), so orphans (ranks
whose launcher was killed) are re-parented to it and reaped, and `getrusage(RUSAGE_CHILDREN)` then
holds the user and system CPU of every process of the run, however it ended. It prints one line:
wall, CPU, and CPU per wall second. CPU seconds barely change with the machine's load, so two
commits can be compared this way on a busy machine (wall times cannot).

No change to the gate: BSD process accounting (acct(2), root only) writes one record per process
at its exit with its user and system CPU, including processes killed by a signal that `getrusage`
of the parent never sees; a poller reads /proc/<pid>/cmdline ten times a second to name them (a
Python process lives at least as long as its imports, so none is missed; a process gone within
0.1 s counts as "unnamed", which is fine: it cannot have cost much CPU). Forked children that never
exec are counted under their parent's kind through the records' parent ids. (`strace -f` was tried
first: tracing the rank processes' threads and signals stalled the 4-rank pool.)

Writes bench/results/gate-processes-<machine>-<date>.json and prints the table. Never imported by
tests.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import struct
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

from bench.machine import ROOT, cpu_model, git_state, slug

ACCT_V3 = struct.Struct("<BBHIIIIIIf8H16s")  # linux/acct.h struct acct_v3, 64 bytes
AHZ = 100  # acct's clock ticks per second


def comp_t(value: int) -> int:
    """acct's 16-bit float: 13-bit mantissa, 3-bit base-8 exponent."""
    return (value & 0x1FFF) << (3 * (value >> 13))


def read_acct(path: Path) -> dict[int, dict]:
    records = {}
    data = path.read_bytes()
    for offset in range(0, len(data) - ACCT_V3.size + 1, ACCT_V3.size):
        (flag, version, _tty, exitcode, _uid, _gid, pid, ppid, btime, etime, *comp, comm) = \
            ACCT_V3.unpack_from(data, offset)
        if version & 0x0F != 3:
            continue
        records[pid] = {"pid": pid, "ppid": ppid, "start": btime, "elapsed": etime / AHZ,
                        "cpu": (comp_t(comp[0]) + comp_t(comp[1])) / AHZ, "exit": exitcode,
                        "forked": bool(flag & 0x01),  # AFORK: forked but never exec'd
                        "comm": comm.split(b"\0")[0].decode(errors="replace")}
    return records


def poll_commands(commands: dict[int, list[str]], stop: threading.Event) -> None:
    """Record every live process's command line until `stop` is set (the first one seen per pid wins,
    except that an exec replacing a fork's copy of its parent's line is kept)."""
    while not stop.is_set():
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")[:-1]
                except OSError:
                    continue
                if argv:
                    commands[int(entry.name)] = [a.decode(errors="replace") for a in argv]
        stop.wait(0.1)


def kind(argv: list[str]) -> str:
    """A short name for what a process was, from its command line."""
    text = " ".join(argv)
    if not argv:
        return "unnamed (gone within 0.1 s)"
    if "exec(eval(sys.stdin.readline()))" in text:
        return "xdist worker"
    if "-m pytest" in text or text.startswith("pytest") or "/pytest " in text:
        return "nested pytest run"
    if "paddle.distributed.launch" in text:
        return "paddle.distributed.launch"
    if "rank_programs/" in text:
        return "rank program: " + next(a for a in argv if "rank_programs/" in a).rsplit("/", 1)[1]
    if "-m engine" in text:
        return "python -m engine " + (argv[argv.index("engine") + 1] if argv[-1] != "engine" else "")
    if "-m verifier" in text:
        rest = argv[argv.index("verifier") + 1:] if "verifier" in argv else []
        return "python -m verifier " + (rest[0] if rest else "")
    if re.search(r"-m verifier\.\w+", text):
        return "python -m " + re.search(r"-m (verifier\.\w+)", text).group(1)
    if "python" in Path(argv[0]).name:
        module = argv[argv.index("-m") + 1] if "-m" in argv else (argv[1] if len(argv) > 1 else "")
        if module == "-c":
            return "python -c"
        return "python " + (Path(module).name if "/" in module else module)
    return Path(argv[0]).name


def run_total_only(command: list[str]) -> tuple[int, float, float]:
    """Run `command`, reap every process it left behind, and return (exit code, wall s, CPU s of the
    whole process tree)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        sys.exit(f"prctl(PR_SET_CHILD_SUBREAPER) failed (errno {ctypes.get_errno()})")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    code = subprocess.call(command, cwd=ROOT)
    wall = time.monotonic() - started
    deadline = time.monotonic() + 60  # orphans still running (a pool's ranks shutting down) are waited for
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            if time.monotonic() > deadline:
                print("warning: processes still running 60 s after the run; their CPU is not counted", file=sys.stderr)
                break
            time.sleep(0.1)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return code, wall, cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--workers", type=int, default=4, help="xdist workers (default 4, as the gate; 0: no xdist, with --total-only)")
    parser.add_argument("--cases", nargs="+", default=["cases/"], help="case files or folders (default cases/)")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/gate-processes-<machine>-<date>.json)")
    parser.add_argument("--total-only", action="store_true",
                        help="no accounting: only the whole run's CPU, via a subreaper (no root, safe to run concurrently)")
    args = parser.parse_args(argv)
    if args.total_only:
        command = [sys.executable, "-m", "pytest", "-n", str(args.workers), *args.cases, "-q", "-p", "no:cacheprovider"]
        if args.workers == 0:
            command[3:5] = ["-p", "no:xdist"]
        code, wall, cpu = run_total_only(command)
        print(f"exit {code}  wall {wall:.1f} s  CPU {cpu:.1f} s  ({cpu / wall:.2f} CPU s per wall s)  {' '.join(args.cases)}")
        return 0

    folder = Path(tempfile.mkdtemp(prefix="gate-processes-"))
    acct_file = folder / "acct"
    acct_file.touch()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.acct(str(acct_file).encode()) != 0:
        sys.exit(f"acct({acct_file}) failed (errno {ctypes.get_errno()}): process accounting needs root")
    command = [sys.executable, "-m", "pytest", "-n", str(args.workers), *args.cases, "-q", "-p", "no:cacheprovider"]
    execs: dict[int, list[str]] = {}
    stop = threading.Event()
    poller = threading.Thread(target=poll_commands, args=(execs, stop), daemon=True)
    poller.start()
    started = time.monotonic()
    print(f"running {' '.join(command)} (log: {folder / 'pytest.log'})", file=sys.stderr)
    try:
        with (folder / "pytest.log").open("w") as log:
            code = subprocess.call(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    finally:
        libc.acct(None)
        stop.set()
        poller.join()
    wall = time.monotonic() - started
    records = read_acct(acct_file)
    pytest_pid = min((pid for pid, argv in execs.items() if "pytest" in " ".join(argv)), default=None)

    def kind_of(pid: int) -> str:
        seen = set()
        while records.get(pid, {}).get("forked") and pid not in seen:  # forked without exec: its parent's
            seen.add(pid)
            pid = records[pid]["ppid"]
        return "gate's own pytest" if pid == pytest_pid else kind(execs.get(pid, []))

    groups = defaultdict(lambda: {"processes": 0, "cpu": 0.0, "examples": []})
    for pid, record in records.items():
        group = groups[kind_of(pid)]
        group["processes"] += 1
        group["cpu"] += record["cpu"]
        if len(group["examples"]) < 3 and pid in execs:
            group["examples"].append(" ".join(execs[pid])[:200])
    total = sum(g["cpu"] for g in groups.values())
    rows = sorted(groups.items(), key=lambda item: -item[1]["cpu"])
    print(f"pytest exit {code}, wall {wall:.0f} s, CPU {total:.0f} s in {len(records)} processes "
          f"(the poller itself included)")
    print(f"{'CPU s':>7} {'share':>6} {'procs':>6}  kind")
    for name, group in rows:
        print(f"{group['cpu']:7.1f} {group['cpu'] / total:6.1%} {group['processes']:6d}  {name}")
    out = args.out or ROOT / "bench" / "results" / f"gate-processes-{slug(cpu_model())}-{time.strftime('%Y%m%d-%H%M')}.json"
    out.write_text(json.dumps({"command": command, "exit": code, "wall_s": wall, "cpu_s": total,
                               "machine": cpu_model(), "git": git_state(), "date": time.strftime("%Y-%m-%d %H:%M"),
                               "kinds": [{"kind": name, **group} for name, group in rows],
                               # every process that used 0.1 s or more, heaviest first
                               "processes": sorted(({"pid": pid, "ppid": r["ppid"], "cpu": r["cpu"],
                                                     "elapsed": round(r["elapsed"], 2), "exit": r["exit"],
                                                     "kind": kind_of(pid), "command": " ".join(execs.get(pid, []))[:400]}
                                                    for pid, r in records.items() if r["cpu"] >= 0.1),
                                                   key=lambda row: -row["cpu"])}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
