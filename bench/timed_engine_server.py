"""The gate's 4-rank engine server (cases/rank_programs/engine_server.py) with timing, for
bench/rank_pool_bench.py only: where a warm request's time goes on each rank.

Each reply carries, besides the server's own keys: `t_start` / `t_end` (epoch seconds around the
handler, so the client can tell pick-up and return latency from the handler), `handle_cpu_s`
(this rank's CPU seconds in the handler), `collective_s` / `collectives` (wall time and count of
the engine's eager collective calls: `Collectives.all_reduce`, `all_gather_last`, `agree`, also per
kind as `<kind>_s` / `<kind>_n`; the all-reduces inside a replayed static program run in C++ and
are not seen here), `steps` / `step_s` (`ModelRunner.step` calls and their wall time) and `dump_s`
(turning the outputs into the reply's arrays). The wrappers reach into the engine on purpose; the
gate never runs this file.
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import paddle.distributed as dist

from engine.distributed import Collectives
from engine.launch import serve
from engine.runner import ModelRunner

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "cases" / "rank_programs"))
import engine_server  # noqa: E402  (the gate's server, imported from its folder)

COLLECTIVES = ("all_reduce", "all_gather_last", "agree")
SPENT: dict[str, float] = {}


def timed(function, *kinds: str):
    """`function`, adding its wall time to SPENT[f"{kind}_s"] and one call to SPENT[f"{kind}_n"]."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            for kind in kinds:
                SPENT[f"{kind}_s"] = SPENT.get(f"{kind}_s", 0.0) + time.perf_counter() - start
                SPENT[f"{kind}_n"] = SPENT.get(f"{kind}_n", 0) + 1

    return wrapper


for _name in COLLECTIVES:
    setattr(Collectives, _name, timed(getattr(Collectives, _name), _name, "collective"))
ModelRunner.step = timed(ModelRunner.step, "step")
engine_server.dump_arrays = timed(engine_server.dump_arrays, "dump")


def handle(request: dict) -> dict:
    SPENT.update({f"{kind}_{unit}": 0 for kind in (*COLLECTIVES, "collective", "step", "dump") for unit in "sn"})
    t_start, cpu = time.time(), time.process_time()
    reply = engine_server.handle(request)
    spent = {**SPENT, "collectives": SPENT["collective_n"], "steps": SPENT["step_n"]}
    return {**reply, "t_start": t_start, "t_end": time.time(), "handle_cpu_s": time.process_time() - cpu, **spent}


if __name__ == "__main__":
    dist.init_parallel_env()
    serve(handle)
