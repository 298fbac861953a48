"""A RankPool server that runs one staged step with probes on, on every rank of a TP/EP job (for
cases/test_probes.py: N ranks vs 1).

Request: {"checkpoint": name, "tp": N, "ep": N, "failpoints": "a,b", "parts": [[cached, new, rest,
decode], ...], "seed": S}: the step of that `Composition` (cases/batches.py), run eagerly on the
engine engine_server.py builds for such a request (the pool's failpoints plus the request's).
Reply: this rank's probed step as flat arrays (verifier/probes.py `to_arrays`) plus "rank" and
"failpoints" (the names planted in that engine).
"""

from __future__ import annotations

import sys
from pathlib import Path

import paddle.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # cases/: batches.py (engine_server.py is beside us)

from batches import Composition, Part, staged
from engine_server import engine_for

from engine.launch import serve
from engine.launch.rank_entry import wait_for_store
from verifier.probes import probe_forward, to_arrays


def handle(request: dict) -> dict:
    runner = engine_for(request).runner
    composition = Composition(tuple(Part(c, n, r, bool(d)) for c, n, r, d in request["parts"]), request["seed"])
    with staged(runner, composition) as batch:
        probed = probe_forward(runner, batch)
    return {**to_arrays(probed), "rank": dist.get_rank(), "failpoints": runner.engine.faults.names}


if __name__ == "__main__":
    wait_for_store()  # engine/launch/rank_entry.py: no 3 s retry at the start
    dist.init_parallel_env()
    serve(handle)
