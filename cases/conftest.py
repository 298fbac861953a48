"""Fixtures shared by several case modules (the root conftest.py holds the profiles and options)."""

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
