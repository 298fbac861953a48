"""A 4-rank job as 2 nodes x 2 ranks through `paddle.distributed.launch --nnodes 2 --ips A,B`.

Two network namespaces joined by a veth pair (cases/netns.py) stand in for two hosts; the same
`python -m engine run --tp 4 --nnodes 2 --ips A,B` runs in each, as a user runs it on each host.
Checked: the dumps of TP4 and TP4+EP4 equal the single-node 4-rank job's bitwise (every rank's);
a rank killed on the second node is the rank that node's CLI names, and both nodes end within
the bound; the collective watchdog names a stuck collective on both nodes. Without the privilege
to make namespaces the cases skip, saying why. Each case costs one 2-node job (and the first two
one single-node job each): one prompt, a few tokens, to keep start-up the main cost.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

import netns
from engine_cli import engine_env, engine_run

from engine.dump import read_dump
from engine.launch import blame
from engine.launch.nodes import Nodes, from_flags
from fixtures.pytest_fixtures import checkpoint_dir
from test_cli_ranks import alive, processes_below, rank_process

ROOT = Path(__file__).resolve().parent.parent
BOUND_S = 240.0  # a hang detector for every subprocess, not a speed check
KILL_BOUND_S = 60.0  # from the kill to both nodes' CLIs ending (gloo's own timeout is far longer)

pytestmark = pytest.mark.skipif(netns.unavailable() is not None, reason=str(netns.unavailable()))


def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"prompts": [{"name": "p0", "input_ids": [501, 500, 505, 194, 87, 3, 14]}]}))
    return path


def host_env(host: netns.Host) -> dict[str, str]:
    """The CLI's environment on `host`: gloo told which interface is the hosts' link (as
    NCCL_SOCKET_IFNAME would be on GPUs)."""
    return {**engine_env(), "GLOO_SOCKET_IFNAME": host.interface}


def start_node(hosts: netns.Hosts, host: netns.Host, faults, args: list, logs: Path) -> subprocess.Popen:
    command = engine_run(faults, checkpoint_dir("glm4_moe"), *args, "--tp", 4, "--nnodes", 2, "--ips", hosts.ips,
                         "--log-dir", logs)
    return subprocess.Popen(host.command(command), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=host_env(host))


def finish(procs: list[subprocess.Popen], timeout_s: float = BOUND_S) -> list[tuple[int, str, str]]:
    """(returncode, stdout, stderr) of each process; all are killed at the shared deadline."""
    deadline = time.monotonic() + timeout_s
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            results.append((proc.returncode, out, err))
    except subprocess.TimeoutExpired:
        ended = [f"node {i} ended with {code}: {err[-1500:]}" for i, (code, _, err) in enumerate(results)]
        raise AssertionError(f"node {len(results)}'s CLI did not end within {timeout_s:g} s; "
                             f"{'; '.join(ended) or 'no node ended'}") from None
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results


def two_node_run(tmp_path: Path, faults, args: list) -> list[tuple[int, str, str]]:
    with netns.two_hosts() as hosts:
        procs = [start_node(hosts, host, faults, args, tmp_path / f"logs{i}")
                 for i, host in enumerate((hosts.first, hosts.second))]
        return finish(procs)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("ep", [1, 4], ids=["tp4", "tp4_ep4"])
def test_two_nodes_dump_what_one_node_dumps_bitwise(tmp_path, faults, ep):
    args = ["--prompts", prompts_file(tmp_path), "--max-new-tokens", 3, "--ep", ep, "--dump-all-ranks"]
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = subprocess.run(engine_run(faults, checkpoint_dir("glm4_moe"), *args, "--tp", 4, "--dump",
                                    tmp_path / "one" / "out.npz", "--log-dir", tmp_path / "logs-one-node"),
                         capture_output=True, text=True, timeout=BOUND_S, cwd=ROOT, env=engine_env())
    assert one.returncode == 0, one.stderr[-3000:]
    results = two_node_run(tmp_path, faults, [*args, "--dump", tmp_path / "two" / "out.npz"])
    for node, (code, out, err) in enumerate(results):
        assert code == 0, f"node {node}: {err[-3000:]}"
        assert out == one.stdout, f"node {node} printed other tokens"
    for name in ["out.npz", *(f"out.rank{r}.npz" for r in range(4))]:
        single, double = read_dump(tmp_path / "one" / name), read_dump(tmp_path / "two" / name)
        assert sorted(single) == sorted(double), name
        differ = [k for k in single if not np.array_equal(single[k], double[k])]
        assert differ == [], f"{name}: {differ} differ between one node and two"


def test_a_rank_killed_on_the_second_node_is_named_there(tmp_path, faults):
    args = ["--prompts", prompts_file(tmp_path), "--max-new-tokens", 400, "-v"]
    with netns.two_hosts() as hosts:
        logs = [tmp_path / "logs0", tmp_path / "logs1"]
        procs = [start_node(hosts, host, faults, args, log) for host, log in zip((hosts.first, hosts.second), logs)]
        try:
            victim = wait_for_step(procs[1], rank=3, log=logs[1] / "workerlog.1", step=3)
        except BaseException:
            finish(procs, timeout_s=0.1)  # kills both nodes' CLIs
            raise
        job = {**processes_below(procs[0].pid), **processes_below(procs[1].pid)}
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        results = finish(procs)
        ended_s = time.monotonic() - killed
    (code_a, _, err_a), (code_b, _, err_b) = results
    # "killed by signal 9" when the launcher's report came first, else "died without a Python exit".
    assert code_b == 1 and error_lines(err_b)[0].startswith("error: the 4-rank job failed: rank 3: "), err_b
    # The first node sees only its own ranks fail on the broken link: one of them is named.
    assert code_a == 1 and re.match(r"error: the 4-rank job failed: rank [01]: ", error_lines(err_a)[0]), err_a
    assert ended_s < KILL_BOUND_S, f"the nodes ended {ended_s:.1f} s after the kill"
    assert [pid for pid in job if alive(pid)] == []


def test_the_watchdog_names_a_stuck_collective_on_both_nodes(tmp_path, faults):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([list(range(1, 9))]))
    planted = faults.with_(type(faults).parse("dist.rank_disagrees,dist.skip_agreement_check"))
    args = ["--prompts", prompts, "--max-new-tokens", 3, "--graph", "piecewise", "--capture-sizes", 8,
            "--decode-capture-sizes", 1, "--collective-timeout", 3]
    results = two_node_run(tmp_path, planted, args)
    stuck = re.compile(r"rank (\d)(?:: | \()stuck in ((all_reduce|all_gather|capture|replay) #\d+ \([^)]+\)) "
                       r"at step 1 for [\d.]+ s \(collective timeout 3 s\)")
    lines = []
    for node, (code, _, err) in enumerate(results):
        errors = error_lines(err)
        assert code == 1 and len(errors) == 1, f"node {node}: {err[-3000:]}"
        lines.append(errors[0])
    # The first node holds the disagreeing rank 1: one of its ranks is named by the watchdog's line.
    found = stuck.search(lines[0])
    assert found and int(found[1]) in (0, 1), lines
    # The second node's ranks wait on the same step across the link: its error says where they were.
    where = re.search(r"; collectives: (.*) \(logs: ", lines[1])
    assert where and re.search(r"ranks? [23](, 3)? in (all_reduce|all_gather|capture|replay) #\d+ \([^)]+\) at step 1",
                               where[1]), lines


def wait_for_step(proc: subprocess.Popen, rank: int, log: Path, step: int) -> int:
    """The pid of `rank`'s process once its log shows it ran `step` (the CLI's -v step lines)."""
    deadline = time.monotonic() + BOUND_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the CLI ended before rank {rank} ran step {step}: {proc.stderr.read()}"
        if log.exists() and f"step {step}:" in log.read_text(errors="replace"):
            pid = rank_process(proc.pid, rank)
            assert pid is not None, f"rank {rank} logged step {step} but has no process below the CLI"
            return pid
        time.sleep(0.05)
    raise AssertionError(f"rank {rank} did not reach step {step} within {BOUND_S:g} s")


# ----------------------------------------------------------------------------- no processes


def test_nodes_from_the_flags_find_this_host_and_refuse_what_cannot_work():
    assert from_flags(1, None) == Nodes()
    assert from_flags(2, "127.0.0.1,10.255.255.254") == Nodes(("127.0.0.1", "10.255.255.254"), 0)
    assert from_flags(2, "10.255.255.254,127.0.0.1").local_ranks(4) == range(2, 4)
    for nnodes, ips, message in [
            (2, None, "--nnodes 2 needs --ips with 2 addresses"),
            (2, "127.0.0.1", "--ips lists 1 addresses but --nnodes is 2"),
            (2, "127.0.0.1,host-b", "'host-b' is not an IPv4 address"),
            (2, "10.255.255.253,10.255.255.254", "exactly one address must belong to this host, found none"),
            (2, "127.0.0.1,127.0.0.2", "found 127.0.0.1, 127.0.0.2"),
            (0, None, "--nnodes must be >= 1")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            from_flags(nnodes, ips)
    with pytest.raises(ValueError, match="3 ranks cannot be split evenly over 2 nodes"):
        Nodes(("10.0.0.1", "10.0.0.2")).per_node(3)


def test_the_launcher_is_told_this_hosts_address_and_a_shared_port():
    second = Nodes(("10.0.0.1", "10.0.0.2"), 1)
    assert second.launcher_args(4, 6070) == ["--nnodes", "2", "--nproc_per_node", "2", "--ips", "10.0.0.1,10.0.0.2",
                                             "--start_port", "6070", "--host", "10.0.0.2"]
    assert Nodes().launcher_args(4, 123) == ["--nnodes", "1", "--nproc_per_node", "4", "--ips", "127.0.0.1",
                                             "--start_port", "123"]


def test_the_launchers_local_rank_number_is_blamed_as_the_global_rank():
    log = "Container rank 1 status failed cmd ['python'] code -9 log workerlog.1"
    evidence = blame.Evidence({}, {3: 10.0}, log, None, None, rank_offset=2)
    assert blame.first_failure(evidence) == ([3], "killed by signal 9 (SIGKILL)")
