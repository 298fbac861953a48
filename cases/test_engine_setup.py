"""The process set-up (engine/threads.py) is applied by building an engine, and never over the user.

Process state (the OpenMP thread count, the environment MKL reads) cannot be undone inside a gate
worker, so each scenario runs in a fresh Python process that builds `LLM(...)` on the smallest
bundled checkpoint and reports what it observes. The thread count is read from the OpenMP runtime
Paddle's kernels use (libiomp5's `omp_get_max_threads`, through ctypes), not from the engine's own
record; the expected values are worked out here from the machine (CPUs this process may use, the
CPU vendor in /proc/cpuinfo), not by calling the code under test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / "fixtures" / "checkpoints" / "qwen3_moe"
PROMPTS = ROOT / "fixtures" / "prompts" / "default.json"
CPUS = len(os.sched_getaffinity(0))
AMD = "vendor_id\t: AuthenticAMD" in Path("/proc/cpuinfo").read_text(errors="replace")
USER_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MKL_DEBUG_CPU_TYPE", "MALLOC_MMAP_THRESHOLD_")

# Runs in the child. `before` (statements) runs first; then the first engine is built, the OpenMP
# count read, the count changed behind the engine's back, a second engine built through the CLI
# (whose run summary is captured) and the count read again.
PROGRAM = """
import contextlib, ctypes, io, json, os, sys
def omp_threads():
    for line in open("/proc/self/maps"):
        if "libiomp5" in line:
            return ctypes.CDLL(line.split()[-1]).omp_get_max_threads()
    return None
{before}
from engine.llm import LLM
import paddle  # imported by now; its import alone sets OMP_NUM_THREADS=1 when unset
seen = {{"threads_before": omp_threads()}}
LLM({checkpoint!r})
seen["threads_after_first"] = omp_threads()
seen["mkl_cpu_type"] = os.environ.get("MKL_DEBUG_CPU_TYPE")
from paddle.base import core
core.set_num_threads({later})  # a user's own change after the first engine
err = io.StringIO()
from engine.__main__ import main
with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    main(["run", "--model", {checkpoint!r}, "--prompts", {prompts!r}, "--max-new-tokens", "1"])
seen["threads_after_second"] = omp_threads()
seen["summary"] = [l for l in err.getvalue().splitlines() if "process set-up" in l]
print(json.dumps(seen))
"""


def observe(before: str = "", env: dict[str, str] | None = None, later: int = CPUS + 2) -> dict:
    """Run PROGRAM in a fresh process with `env` added to a copy of this one's (the user variables
    removed first) and return what it saw."""
    child_env = {k: v for k, v in os.environ.items() if k not in USER_VARS}
    child_env.update({"PYTHONPATH": str(ROOT), **(env or {})})
    code = PROGRAM.format(before=before, checkpoint=str(CHECKPOINT), prompts=str(PROMPTS), later=later)
    done = subprocess.run([sys.executable, "-c", code], env=child_env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    if seen["threads_before"] is None:
        pytest.skip("this Paddle build does not use libiomp5: the thread count cannot be read independently")
    return seen


def test_the_first_engine_applies_the_set_up_once_and_states_it():
    seen = observe()
    assert seen["threads_before"] == 1, "Paddle's import alone should leave one kernel thread"
    assert seen["threads_after_first"] == CPUS, "LLM() must give the kernels one thread per usable CPU"
    assert seen["mkl_cpu_type"] == ("5" if AMD else None), "MKL's AVX2 path on AMD only, untouched elsewhere"
    # A second engine in the same process leaves the user's later change alone (applied once).
    assert seen["threads_after_second"] == CPUS + 2
    assert len(seen["summary"]) == 1 and f"threads {CPUS} " in seen["summary"][0], seen["summary"]
    assert ("MKL_DEBUG_CPU_TYPE=5" in seen["summary"][0]) == AMD, seen["summary"]


def test_the_users_environment_is_never_overridden():
    users = CPUS + 1
    seen = observe(env={"OMP_NUM_THREADS": str(users), "MKL_DEBUG_CPU_TYPE": "2"})
    assert seen["threads_after_first"] == users, "LLM() replaced the user's OMP_NUM_THREADS"
    assert seen["mkl_cpu_type"] == "2", "LLM() replaced the user's MKL_DEBUG_CPU_TYPE"
    assert f"OMP_NUM_THREADS={users}" in seen["summary"][0], seen["summary"]


def test_an_explicit_call_before_the_first_engine_is_kept():
    users = CPUS + 1
    seen = observe(before=f"from engine.threads import set_threads\nset_threads({users})")
    assert seen["threads_after_first"] == users, "LLM() replaced the thread count the user set"
