"""Fixtures shared by several case modules, and the gate's fail-fast order (the root conftest.py
holds the profiles and options)."""

from __future__ import annotations

import pytest

from verifier.shard_plugin import group_names


@pytest.fixture(scope="session")
def four_rank_pool(faults):
    """One warm 4-rank engine-server job for every module of the xdist group "four_ranks"
    (test_parallel.py, test_parallel_sparse.py). `--dist loadgroup` runs the group on one worker,
    so the modules share the ranks, their loaded engines and captured graphs, and pay the start
    (10-20 s) once. Session scope: the ranks stay up, idle, until the worker ends."""
    from four_ranks import RememberingPool, start_pool  # deferred: the launcher's imports cost every process 0.3 s

    with start_pool(faults, start_timeout_s=180, request_timeout_s=180) as ranks:
        yield RememberingPool(ranks)  # a request asked twice reaches the ranks once


@pytest.fixture(scope="session")
def probe_rank_pool(faults):
    """One warm 2-rank TP job of cases/rank_programs/probe_server.py for the xdist group
    "probe_ranks" (test_probes.py, test_failpoint_reach.py), planting the run's --failpoints."""
    from pathlib import Path

    from verifier.rank_pool import RankPool

    root = Path(__file__).resolve().parent.parent
    with RankPool([str(root / "cases" / "rank_programs" / "probe_server.py")], 2, failpoints=faults,
                  env={"PYTHONPATH": str(root)}, start_timeout_s=180, request_timeout_s=180) as pool:
        yield pool


@pytest.fixture(scope="session")
def two_rank_routing_job(faults, tmp_path_factory):
    """One small `python -m engine run --tp 2` job recording routing (2 prompts, 2 new tokens, the
    run's --failpoints; piecewise graphs, so that graph-only faults such as dist.rank_disagrees bite), with cases/write_watch.py's observer in every process, for the xdist group
    "two_rank_cli" (test_routing_writer_rank.py, test_failpoint_reach.py). Returns its completed
    process, log folder, routing folder and observer log folder."""
    import json
    import subprocess
    from types import SimpleNamespace

    from engine_cli import ROOT, engine_env, engine_run
    from write_watch import install

    from fixtures.pytest_fixtures import checkpoint_dir

    base = tmp_path_factory.mktemp("two-rank-routing")
    job = SimpleNamespace(logs=base / "logs", routing=base / "r3", watch_logs=base / "writes")
    install(base / "hook", job.routing, job.watch_logs)
    prompts = base / "prompts.json"
    prompts.write_text(json.dumps({"prompts": [{"name": "first", "input_ids": [1, 2, 3, 4, 5]},
                                               {"name": "second", "input_ids": [9, 8, 7]}]}))
    env = engine_env()
    env["PYTHONPATH"] = f"{base / 'hook'}:{env['PYTHONPATH']}"
    job.done = subprocess.run(engine_run(faults, checkpoint_dir("glm4_moe"), "--prompts", prompts, "--tp", 2,
                                         "--max-new-tokens", 2, "--graph", "piecewise", "--capture-sizes", 8,
                                         "--decode-capture-sizes", 2, "--routing-replay-dir", job.routing,
                                         "--log-dir", job.logs),
                              capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    return job


def pytest_ignore_collect(collection_path, config):
    """The battery (test_user_model.py) runs on --model checkpoints only: without one the file is
    not even imported, so the default gate pays nothing for it."""
    if collection_path.name == "test_user_model.py" and not config.getoption("--model"):
        return True
    # The battery's planted-fault proof (about 2 minutes) runs when named, never in the default gate.
    if collection_path.name == "test_model_battery_selftest.py":
        return not any("test_model_battery_selftest" in str(arg) for arg in config.args) or None
    return None


# ----------------------------------------------------------------------------- fail-fast order
# Which cases start first, and why: cases/gate_order.py.


def pytest_addoption(parser):
    parser.addoption("--gate-order", choices=("fail-fast", "files", "xdist"), default="fail-fast",
                     help="fail-fast (default): cases/gate_order.py's order; files: the order the command line "
                          "names the files in (the selftest's area-first runs); xdist: collection order re-sorted "
                          "by xdist (the order before issue 22, kept to measure the difference: bench/first_failure.py)")


def pytest_configure(config):
    if config.getoption("--gate-order") == "xdist":
        return
    # xdist's default re-sort of scopes by size would undo the order (gate_order.py). The option exists
    # only with xdist installed; without it there is nothing to re-sort.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(session, config, items):
    for item in items:  # xdist joins several group marks into a group of its own, which another
        # worker may run (beside a second warm pool): a case names one group only
        names = group_names(item)
        if len(names) > 1:
            raise pytest.UsageError(f"{item.nodeid}: xdist_group marks {sorted(names)}; give it one group only")
    if config.getoption("--gate-order") != "fail-fast":
        return
    from gate_order import sort_items  # cases/ is on sys.path, as for the other helper modules

    sort_items(items)
