"""One host's share of a 2-node engine-server RankPool, for cases/test_two_nodes.py.

Run once per host (inside each network namespace) with the same arguments, as the pool's contract
says (verifier/rank_pool.py: "each host makes its own pool with the same arguments"):

    python cases/rank_programs/pool_node.py IPS START_PORT REQUESTS.json OUT_DIR LOG_DIR [FAILPOINTS]

It starts this host's 2 of 4 ranks of cases/rank_programs/engine_server.py through RankPool(nodes=...,
start_port=...), sends every request of REQUESTS.json (a JSON list) in order, and writes each
reply of this host's ranks to OUT_DIR/request{i}.rank{R}.npz (engine/launch/wire.py's format, no
pickle), then closes the pool. Exit 0 when every request was answered; a RankJobError's message
and exit 1 otherwise.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from engine.launch import wire
from engine.launch.nodes import from_flags
from verifier.rank_pool import RankJobError, RankPool

ROOT = Path(__file__).resolve().parent.parent.parent
SERVER = str(ROOT / "cases" / "rank_programs" / "engine_server.py")
BOUND_S = 180.0  # a hang detector on loaded cores, not a speed check


def main(ips: str, start_port: str, requests: str, out_dir: str, log_dir: str, failpoints: str = "") -> int:
    nodes = from_flags(2, ips)
    out = Path(out_dir)
    try:
        with RankPool([SERVER], 4, failpoints=failpoints, env={"PYTHONPATH": str(ROOT)}, nodes=nodes,
                      start_port=int(start_port), log_dir=Path(log_dir), start_timeout_s=BOUND_S,
                      request_timeout_s=BOUND_S) as pool:
            for number, request in enumerate(json.loads(Path(requests).read_text())):
                for rank, reply in zip(pool.ranks, pool.request(request)):
                    wire.write_atomic(out / f"request{number}.rank{rank}.npz", wire.encode(reply))
    except RankJobError as err:
        print(f"error: node {nodes.this}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
