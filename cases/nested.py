"""The environment of the pytest runs the gate's own cases start (nested runs on synthetic files).

Every pytest process loads each installed plugin's entry point. Two installed here are never used
by a case and cost a nested run's controller and each of its xdist workers ~0.3 s of CPU apiece
(anyio's plugin imports trio; pytest-benchmark its session machinery): about a quarter of a tiny
run's start. PYTEST_ADDOPTS reaches every pytest the run starts (`python -m verifier gate` and
`verifier.selftest` pass their environment on, xdist workers inherit it), so the nested runs block
them; the plugins under test (verifier.plugin, shard_plugin, xdist, hypothesis) still load.

A nested run starts in a folder of synthetic cases, where `-p verifier.plugin` and
`python -m verifier.selftest` import whatever `verifier` the interpreter finds there: the installed
one, which may be another checkout's (a second worktree, or a CI job's deleted folder that an
editable install still points at). So this checkout's root goes first on PYTHONPATH: the nested
runs test the code of the gate that starts them.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

UNUSED_PLUGINS = "-p no:anyio -p no:benchmark"
# For a nested run whose cases and conftest never use hypothesis: its pytest plugin imports the
# whole library (~0.2 s of CPU in each process of the run: the controller and every xdist worker).
NO_HYPOTHESIS = ("-p", "no:hypothesispytest")


def nested_env(**values: str) -> dict[str, str]:
    """os.environ plus `values`, with this checkout first on PYTHONPATH (unless `values` sets it)
    and the unused plugins blocked after any PYTEST_ADDOPTS set."""
    env = dict(os.environ, **values)
    if "PYTHONPATH" not in values:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env["PYTEST_ADDOPTS"] = " ".join(filter(None, [env.get("PYTEST_ADDOPTS", ""), UNUSED_PLUGINS]))
    return env
