"""RankPool server for cases/test_launch.py.

Request: {"x": float32 array, "raise_on": None | "all" | rank}. Reply: {"sum": all_reduce of
x * (rank + 1), "rank": rank, "failpoints": the pool's (this program runs no engine code, but
announces them like every pool program)}. A planted error is raised before the all_reduce, so with
"raise_on": rank the other ranks wait in the collective and never reply.
"""

from __future__ import annotations

import paddle
import paddle.distributed as dist

from engine.launch import serve
from engine.launch.rank_entry import pool_failpoints, wait_for_store


def handle(request: dict) -> dict:
    rank = dist.get_rank()
    if request.get("raise_on") in ("all", rank):
        raise ValueError(f"planted failure on rank {rank}")
    value = paddle.to_tensor(request["x"]) * (rank + 1)
    dist.all_reduce(value)
    return {"sum": value.numpy(), "rank": rank, "failpoints": pool_failpoints().names}


if __name__ == "__main__":
    wait_for_store()  # engine/launch/rank_entry.py: no 3 s retry at the start
    dist.init_parallel_env()
    serve(handle)
