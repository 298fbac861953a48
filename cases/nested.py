"""The environment of the pytest runs the gate's own cases start (nested runs on synthetic files).

Every pytest process loads each installed plugin's entry point. Two installed here are never used
by a case and cost a nested run's controller and each of its xdist workers ~0.3 s of CPU apiece
(anyio's plugin imports trio; pytest-benchmark its session machinery): about a quarter of a tiny
run's start. PYTEST_ADDOPTS reaches every pytest the run starts (`python -m verifier gate` and
`verifier.selftest` pass their environment on, xdist workers inherit it), so the nested runs block
them; the plugins under test (verifier.plugin, shard_plugin, xdist, hypothesis) still load.
"""

from __future__ import annotations

import os

UNUSED_PLUGINS = "-p no:anyio -p no:benchmark"
# For a nested run whose cases and conftest never use hypothesis: its pytest plugin imports the
# whole library (~0.2 s of CPU in each process of the run: the controller and every xdist worker).
NO_HYPOTHESIS = ("-p", "no:hypothesispytest")


def nested_env(**values: str) -> dict[str, str]:
    """os.environ plus `values`, with the unused plugins blocked after any PYTEST_ADDOPTS set."""
    env = dict(os.environ, **values)
    env["PYTEST_ADDOPTS"] = " ".join(filter(None, [env.get("PYTEST_ADDOPTS", ""), UNUSED_PLUGINS]))
    return env
