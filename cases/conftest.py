"""Fixtures shared by several case modules, and the gate's fail-fast order (the root conftest.py
holds the profiles and options)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def four_rank_pool():
    """One warm 4-rank engine-server job for every module of the xdist group "four_ranks"
    (test_parallel.py, test_parallel_sparse.py). `--dist loadgroup` runs the group on one worker,
    so the modules share the ranks, their loaded engines and captured graphs, and pay the start
    (10-20 s) once. Session scope: the ranks stay up, idle, until the worker ends."""
    from four_ranks import start_pool  # deferred: the launcher's imports cost every process 0.3 s

    with start_pool(start_timeout_s=180, request_timeout_s=180) as ranks:
        yield ranks


# ----------------------------------------------------------------------------- fail-fast order
# Which cases start first, and why: cases/gate_order.py.


def pytest_addoption(parser):
    parser.addoption("--gate-order", choices=("fail-fast", "xdist"), default="fail-fast",
                     help="fail-fast (default): cases/gate_order.py's order; xdist: collection order re-sorted by xdist "
                          "(the order before issue 22, kept to measure the difference: bench/first_failure.py)")


def pytest_configure(config):
    if config.getoption("--gate-order") == "xdist":
        return
    # xdist's default re-sort of scopes by size would undo the order (gate_order.py). The option exists
    # only with xdist installed; without it there is nothing to re-sort.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(session, config, items):
    if config.getoption("--gate-order") == "xdist":
        return
    from gate_order import sort_items  # cases/ is on sys.path, as for the other helper modules

    sort_items(items)
