"""Rank jobs over 2 nodes through `paddle.distributed.launch --nnodes 2 --ips A,B`.

Two network namespaces joined by a veth pair (cases/netns.py) stand in for two hosts; the same
`python -m engine run --tp N --nnodes 2 --ips A,B` runs in each, as a user runs it on each host.
Checked: the dumps of TP4 and TP4+EP4 (2 nodes x 2 ranks) equal the single-node 4-rank job's
bitwise (every rank's); a rank killed on the second node is the rank that node's CLI names, and
both nodes end within the bound; the collective watchdog names a stuck collective on both nodes;
a second node that never starts is named by the first within the start-up bound (--start-timeout);
a 2-node RankPool (one per host, as a user's harness would make it) answers TP4 and TP4+EP4
requests bitwise as the 1-node pool does. The three failure cases run 2 nodes x 1 rank (--tp 2):
what they check (which node names which rank, the bounds) needs one rank per host, and every rank
is a process that imports Paddle and loads the model; the bitwise cases keep 2 ranks per host,
so a host's ranks share its launcher and the TP4 reference is the warm pool's.
Without the privilege to make namespaces the cases skip, saying why. Each case costs one 2-node job
(the last one node's half): one prompt, two tokens, so that start-up is the main cost. The
single-node reference is the warm 4-rank pool of the xdist group "four_ranks" (cases/conftest.py),
which the dump and pool cases join; the others form the group "two_nodes", so no two of them share
the cores. One namespace pair serves a worker's cases (module scope); each case's job serves its
store on its own --start-port, so a job never meets the previous one's sockets.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import netns
from engine_cli import engine_env, engine_run

from engine.dump import read_dump
from engine.launch import blame, wire
from engine.launch.nodes import Nodes, from_flags
from fixtures.pytest_fixtures import checkpoint_dir
from test_cli_ranks import alive, processes_below, wait_for_step
from test_launch import masters

ROOT = Path(__file__).resolve().parent.parent
BOUND_S = 240.0  # a hang detector for every subprocess, not a speed check
KILL_BOUND_S = 60.0  # from the kill to both nodes' CLIs ending (gloo's own timeout is far longer)

START_BOUND_S = 6.0  # the start-up bound of the case whose second node never starts
START_DEADLINE_S = 45.0  # that case's own deadline: the bound, the stack dumps, the stop, on loaded cores
TOKENS = 2  # a prefill and one decode step: enough for bitwise equality, cheap on two cores

pytestmark = pytest.mark.skipif(netns.unavailable() is not None, reason=str(netns.unavailable()))

# The 2-node failure jobs run one after another on one worker, never two at once on two cores (each
# is 2 CLIs, 2 launchers and 2 ranks). The two bitwise cases are in "four_ranks" instead, the group
# whose warm pool gives their reference. A case must carry one group mark only: xdist joins several
# into a group of their own ("four_ranks_two_nodes"), which a second worker then ran, starting a
# second 4-rank pool for its two requests.
TWO_NODES = pytest.mark.xdist_group("two_nodes")


# Each case's own --start-port (rank 0's store; the launcher assigns the next port to the other rank).
PORTS = {"dump": 6170, "kill": 6270, "watchdog": 6370, "never_starts": 6470, "pool": 6570}


@pytest.fixture(scope="module")
def hosts():
    """One namespace pair for this worker's cases of the module (making one costs ~0.1 s of `ip`
    calls, but a pair per case also meant a pair per failure to clean up)."""
    with netns.two_hosts() as pair:
        yield pair


def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"prompts": [{"name": "p0", "input_ids": PROMPT}]}))
    return path


def host_env(host: netns.Host) -> dict[str, str]:
    """The CLI's environment on `host`: gloo told which interface is the hosts' link (as
    NCCL_SOCKET_IFNAME would be on GPUs)."""
    return {**engine_env(), "GLOO_SOCKET_IFNAME": host.interface}


def start_node(hosts: netns.Hosts, host: netns.Host, faults, args: list, logs: Path, port: int,
               tp: int = 4) -> subprocess.Popen:
    command = engine_run(faults, checkpoint_dir("glm4_moe"), *args, "--tp", tp, "--nnodes", 2, "--ips", hosts.ips,
                         "--log-dir", logs, "--start-port", port)
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


def two_node_run(hosts: netns.Hosts, tmp_path: Path, faults, args: list, port: int,
                 tp: int = 4) -> list[tuple[int, str, str]]:
    procs = [start_node(hosts, host, faults, args, tmp_path / f"logs{i}", port, tp)
             for i, host in enumerate((hosts.first, hosts.second))]
    return finish(procs)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


PROMPT = [501, 500, 505, 194, 87, 3, 14]


def request(ep: int) -> dict:
    """The 4-rank engine-server request that matches the CLI's defaults (eager, sparse MoE form)."""
    return {"checkpoint": "glm4_moe", "tp": 4, "ep": ep, "moe_form": "sparse", "prompts": [PROMPT],
            "max_new_tokens": TOKENS}


def one_node(pool, payload: dict) -> list[dict]:
    """The warm 1-node pool's replies: the dump case and the pool case both compare against its TP4
    run of the same request, which reaches the ranks once (cases/four_ranks.py RememberingPool)."""
    return pool.request(payload)


def outputs(reply: dict) -> dict:
    return {k: v for k, v in reply.items() if k not in ("rank", "stats", "failpoints")}


def assert_bitwise(single: dict, double: dict, name: str) -> None:
    assert sorted(single) == sorted(double), name
    differ = [k for k in single if not np.array_equal(single[k], double[k])]
    assert differ == [], f"{name}: {differ} differ between one node and two"


@pytest.mark.xdist_group("four_ranks")  # the reference comes from that group's warm 4-rank pool
def test_two_nodes_dump_what_one_node_dumps_bitwise(hosts, tmp_path, faults, four_rank_pool):
    """The single-node 4-rank reference is the warm pool's run of the same engine configuration,
    so no single-node job is started here. TP4 only: TP4+EP4 over two nodes is the pool case's
    (the CLI passes --ep to the same engine). --start-port reaches both hosts' ranks."""
    args = ["--prompts", prompts_file(tmp_path), "--max-new-tokens", TOKENS, "--dump-all-ranks"]
    one = one_node(four_rank_pool, request(ep=1))
    results = two_node_run(hosts, tmp_path, faults, [*args, "--dump", tmp_path / "out.npz"], PORTS["dump"])
    for node, (code, out, err) in enumerate(results):
        assert code == 0, f"node {node}: {err[-3000:]}"
        assert out == f"p0: {' '.join(map(str, one[0]['greedy_p0']))}\n", f"node {node} printed other tokens"
        assert masters(tmp_path / f"logs{node}") == {f"{hosts.first.address}:{PORTS['dump']}"}, node
    for name, reference in [("out.npz", one[0]), *((f"out.rank{r}.npz", one[r]) for r in range(4))]:
        assert_bitwise(outputs(reference), read_dump(tmp_path / name), name)


@pytest.mark.xdist_group("four_ranks")  # the reference comes from that group's warm 4-rank pool
def test_a_two_node_rank_pool_answers_what_the_one_node_pool_answers_bitwise(hosts, tmp_path, faults,
                                                                             four_rank_pool):
    """RankPool(nodes=...) on each host (cases/rank_programs/pool_node.py, in its namespace) with
    the same arguments: one start, then a TP4 and a TP4+EP4 request, each rank's reply equal to
    the warm 1-node pool's for the same request."""
    requests = [request(ep=1), request(ep=4)]
    (tmp_path / "requests.json").write_text(json.dumps(requests))
    procs = []
    for node, host in enumerate((hosts.first, hosts.second)):
        (tmp_path / f"out{node}").mkdir()
        command = [sys.executable, str(ROOT / "cases" / "rank_programs" / "pool_node.py"), hosts.ips, str(PORTS["pool"]),
                   str(tmp_path / "requests.json"), str(tmp_path / f"out{node}"), str(tmp_path / f"logs{node}"),
                   faults.names]
        procs.append(subprocess.Popen(host.command(command), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, cwd=ROOT, env=host_env(host)))
    for node, (code, _, err) in enumerate(finish(procs)):
        assert code == 0, f"node {node}: {err[-3000:]}"
    for number, payload in enumerate(requests):
        one = one_node(four_rank_pool, payload)
        for rank in range(4):
            name = f"request{number}.rank{rank}.npz"
            double = wire.decode((tmp_path / f"out{rank // 2}" / name).read_bytes())
            assert (double["rank"], double["failpoints"]) == (rank, one[rank]["failpoints"]), name
            assert_bitwise(outputs(one[rank]), outputs(double), name)


@TWO_NODES
def test_a_rank_killed_on_the_second_node_is_named_there(hosts, tmp_path, faults):
    """2 nodes x 1 rank: rank 1, alone on the second node, is killed mid-run."""
    args = ["--prompts", prompts_file(tmp_path), "--max-new-tokens", 400, "-v"]
    logs = [tmp_path / "logs0", tmp_path / "logs1"]
    procs = [start_node(hosts, host, faults, args, log, PORTS["kill"], tp=2)
             for host, log in zip((hosts.first, hosts.second), logs)]
    try:
        victim = wait_for_step(procs[1], rank=1, log=logs[1] / "workerlog.0", step=2)
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
    assert code_b == 1 and error_lines(err_b)[0].startswith("error: the 2-rank job failed: rank 1: "), err_b
    # The first node sees only its own rank fail on the broken link: it is named, not the far one.
    assert code_a == 1 and error_lines(err_a)[0].startswith("error: the 2-rank job failed: rank 0: "), err_a
    assert ended_s < KILL_BOUND_S, f"the nodes ended {ended_s:.1f} s after the kill"
    assert [pid for pid in job if alive(pid)] == []


@TWO_NODES
def test_the_watchdog_names_a_stuck_collective_on_both_nodes(hosts, tmp_path, faults):
    """2 nodes x 1 rank: rank 1 (the second node's) runs the step eagerly while rank 0 replays
    its graph, and neither learns it from the other (the agreement check is skipped)."""
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([list(range(1, 9))]))
    planted = faults.with_(type(faults).parse("dist.rank_disagrees,dist.skip_agreement_check"))
    args = ["--prompts", prompts, "--max-new-tokens", TOKENS, "--graph", "piecewise", "--capture-sizes", 8,
            "--decode-capture-sizes", 1, "--collective-timeout", 3]
    results = two_node_run(hosts, tmp_path, planted, args, PORTS["watchdog"], tp=2)
    stuck = re.compile(r"rank (\d)(?:: | \()stuck in ((all_reduce|all_gather|capture|replay) #\d+ \([^)]+\)) "
                       r"at step 1 for [\d.]+ s \(collective timeout 3 s\)")
    lines = []
    for node, (code, _, err) in enumerate(results):
        errors = error_lines(err)
        assert code == 1 and len(errors) == 1, f"node {node}: {err[-3000:]}"
        lines.append(errors[0])
    # The second node holds the disagreeing rank 1: it is named by the watchdog's line.
    found = stuck.search(lines[1])
    assert found and int(found[1]) == 1, lines
    # The first node's rank waits on the same step across the link: its error says where it was.
    where = re.search(r"; collectives: (.*) \(logs: ", lines[0])
    assert where and re.search(r"rank 0 in (all_reduce|all_gather|capture|replay) #\d+ \([^)]+\) at step 1",
                               where[1]), lines


@TWO_NODES
def test_a_second_node_that_never_starts_is_named_within_the_start_up_bound(hosts, tmp_path, faults):
    """2 nodes x 1 rank, and only node 0's command runs: its rank waits in init_parallel_env for
    rank 1, which never comes. The CLI must end with one error naming this node and the missing
    peer's address, soon after the start-up bound, and leave no process behind (not wait until
    the case's deadline)."""
    args = ["--prompts", prompts_file(tmp_path), "--max-new-tokens", TOKENS, "--start-timeout", START_BOUND_S]
    started = time.monotonic()
    proc = start_node(hosts, hosts.first, faults, args, tmp_path / "logs0", PORTS["never_starts"], tp=2)
    job = wait_for_ranks(proc, tmp_path / "logs0", count=1, until=started + START_DEADLINE_S)
    [(code, _, err)] = finish([proc], timeout_s=max(0.1, started + START_DEADLINE_S - time.monotonic()))
    ended_s = time.monotonic() - started
    first, second = hosts.first.address, hosts.second.address
    errors = error_lines(err)
    assert code == 1 and len(errors) == 1, err[-3000:]
    assert errors[0].startswith(
        f"error: the 2-rank job failed: rank 0: node 0 ({first}): rank 0 did not join the 2-rank job "
        f"within the start-up bound of {START_BOUND_S:g} s; peers never arrived: node 1 ({second}); "), errors[0]
    assert START_BOUND_S < ended_s, f"the CLI ended {ended_s:.1f} s after the start, before the bound"
    assert [pid for pid in job if alive(pid)] == []


def wait_for_ranks(proc: subprocess.Popen, log_dir: Path, count: int, until: float) -> dict[int, dict[str, str]]:
    """Every process seen below the CLI until `count` ranks have logs in `log_dir` and processes below
    it, or until the CLI ends: on loaded cores the start-up bound can pass before a rank has finished
    importing Paddle, and then the CLI rightly ends first (seen twice under `-n 2`; the case used to
    fail there, a false alarm). Whatever was seen is what the case checks is gone afterwards."""
    seen: dict[int, dict[str, str]] = {}
    while time.monotonic() < until:
        below = processes_below(proc.pid)
        seen |= below
        ranks = {env.get("PADDLE_TRAINER_ID") for env in below.values()} - {None}
        if len(ranks) >= count and len(list(log_dir.glob("workerlog.*"))) >= count or proc.poll() is not None:
            return seen
        time.sleep(0.1)
    finish([proc], timeout_s=0.1)
    raise AssertionError(f"{count} ranks did not start within the case's deadline")




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


# /proc/net/tcp rows (sl, local, remote, state): 10.0.0.1 is 0100000A in host order on x86,
# 6070 is 17B6; state 01 is ESTABLISHED, 0A is LISTEN.
TCP_HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"


def tcp_row(local: str, remote: str, state: str) -> str:
    return f"   0: {local} {remote} {state} 00000000:00000000 00:00000000 00000000     0        0 1\n"


def test_the_missing_peers_are_read_from_the_connections_to_rank_0s_store():
    three = ("10.0.0.1", "10.0.0.2", "10.0.0.3")
    listen = tcp_row("0100000A:17B6", "00000000:0000", "0A")
    from_b = tcp_row("0100000A:17B6", "0200000A:9C40", "01")  # node 1 (10.0.0.2) reached the store
    closing = tcp_row("0100000A:17B6", "0300000A:9C41", "06")  # node 2's old connection, TIME_WAIT
    assert Nodes(three, 0).missing_peers(6070, TCP_HEADER + listen + from_b + closing) == "node 2 (10.0.0.3)"
    assert Nodes(three, 0).missing_peers(6070, TCP_HEADER + listen) == "node 1 (10.0.0.2), node 2 (10.0.0.3)"
    other_port = tcp_row("0100000A:17B7", "0200000A:9C40", "01")
    assert Nodes(three[:2], 0).missing_peers(6070, TCP_HEADER + other_port) == "node 1 (10.0.0.2)"
    assert Nodes(three[:2], 0).missing_peers(6070, TCP_HEADER + from_b) == "none: every node reached rank 0's store"
    to_store = tcp_row("0200000A:9C40", "0100000A:17B6", "01")  # seen from node 1
    assert Nodes(three[:2], 1).missing_peers(6070, TCP_HEADER) == \
        "node 0 (10.0.0.1) (its store on 10.0.0.1:6070 was not reached)"
    assert Nodes(three, 1).missing_peers(6070, TCP_HEADER + to_store) == \
        "not known here (node 0's store was reached; the others: node 2 (10.0.0.3))"


def test_the_launchers_local_rank_number_is_blamed_as_the_global_rank():
    log = "Container rank 1 status failed cmd ['python'] code -9 log workerlog.1"
    evidence = blame.Evidence({}, {3: 10.0}, log, None, None, rank_offset=2)
    assert blame.first_failure(evidence) == ([3], "killed by signal 9 (SIGKILL)")


def test_a_negative_start_up_bound_is_refused_before_any_rank_starts(capsys):
    from engine.__main__ import main

    code = main(["run", "--model", "m", "--prompts", "p.json", "--tp", "4", "--nnodes", "2",
                 "--ips", "127.0.0.1,10.255.255.254", "--start-timeout", "-1"])
    assert (code, capsys.readouterr().err) == (2, "error: --start-timeout must be >= 0 seconds (0: no bound), got -1\n")


def test_a_start_port_out_of_range_or_taken_is_refused_before_any_rank_starts(capsys):
    from engine.__main__ import main

    two_nodes = ["--tp", "4", "--nnodes", "2", "--ips", "127.0.0.1,10.255.255.254"]
    for port, per_node in [("80", 2), ("65535", 2)]:  # 2 ranks per node need P and P+1
        code = main(["run", "--model", "m", "--prompts", "p.json", *two_nodes, "--start-port", port])
        assert (code, capsys.readouterr().err) == (2, f"error: --start-port must be an integer in [1024, "
                                                      f"{65536 - per_node}] (the first of {per_node} ports, one "
                                                      f"per rank on this host), got {port}\n")
    with socket.socket() as held:  # another server on the port rank 0 would serve its store on
        held.bind(("", 0))
        held.listen()
        port = held.getsockname()[1]
        code = main(["run", "--model", "m", "--prompts", "p.json", "--tp", "2", "--start-port", str(port)])
        assert (code, capsys.readouterr().err) == (
            2, f"error: --start-port {port}: that port is in use on this host; choose another\n")
