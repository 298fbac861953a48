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



def _cpuinfo(tmp_path, vendor: str):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: 25\n")
    return path


def test_cpu_vendor_is_read_from_cpuinfo_and_none_when_unreadable(tmp_path):
    assert threads.cpu_vendor(_cpuinfo(tmp_path, "AuthenticAMD")) == "AuthenticAMD"
    assert threads.cpu_vendor(tmp_path / "missing") is None


def test_amd_gets_mkl_avx2_kernels_intel_is_left_alone(monkeypatch):
    monkeypatch.setenv("MKL_DEBUG_CPU_TYPE", "unset-me")  # so that undoing removes what the case sets
    monkeypatch.delenv("MKL_DEBUG_CPU_TYPE")
    assert threads.choose_gemm_path("GenuineIntel") is None
    assert "MKL_DEBUG_CPU_TYPE" not in os.environ
    assert threads.choose_gemm_path("AuthenticAMD") == "5"
    assert os.environ["MKL_DEBUG_CPU_TYPE"] == "5"


def test_a_users_mkl_choice_is_kept(monkeypatch):
    monkeypatch.setenv("MKL_DEBUG_CPU_TYPE", "2")
    assert threads.choose_gemm_path("AuthenticAMD") == "2"


def test_large_blocks_are_kept_on_glibc_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    import platform

    if platform.libc_ver()[0] == "glibc":
        assert threads.keep_large_blocks() is True
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert threads.keep_large_blocks() is False


def test_gate_workers_keep_one_kernel_thread():
    """fixtures/pytest_fixtures.py's `one_kernel_thread` pinned this worker before its first engine
    (it skips only synthetic gates outside the repository, which run no kernel)."""
    from engine.threads import prepare_engine

    setup = prepare_engine()
    assert (setup.threads, setup.threads_source) == (1, "set_threads(1)"), setup.describe()
