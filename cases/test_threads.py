"""The thread-count setting: the policy's numbers and the user errors. (Its effect on speed is
measured in bench/threads_bench.py, never asserted here.)"""

from __future__ import annotations

import os

import pytest

from engine import threads


def test_default_gives_each_rank_its_share_of_the_cpus_and_at_least_one(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert threads.default_threads() == 4
    assert threads.default_threads(ranks=2) == 2
    assert threads.default_threads(ranks=8) == 1


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_a_bad_count_names_the_value(bad):
    with pytest.raises(ValueError, match=f"threads={bad!r}"):
        threads.set_threads(bad)

