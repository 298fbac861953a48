"""The warm 4-rank engine-server job that the 4-rank cases share (cases/conftest.py's
`four_rank_pool`), and how to start another one."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np

from engine.failpoints import Failpoints
from verifier.rank_pool import RankPool

ROOT = Path(__file__).resolve().parent.parent
SERVER = str(ROOT / "cases" / "rank_programs" / "engine_server.py")
# Requests with effects beyond their reply: a routing-replay run writes the case's folder, and a
# planted hung or dead rank is the question itself. They always reach the ranks.
UNREPEATABLE = ("routing_replay_dir", "hang", "exit")


def start_pool(faults: Failpoints, **timeouts) -> RankPool:
    """4 ranks of cases/rank_programs/engine_server.py planting `faults` (the run's `--failpoints`)
    in every engine they build; `timeouts` as RankPool takes them."""
    return RankPool([SERVER], 4, failpoints=faults, env={"PYTHONPATH": str(ROOT)}, **timeouts)


def canonical(payload: dict) -> str:
    """One string per request: keys sorted, arrays by dtype, shape and values."""
    def plain(value):
        if isinstance(value, np.ndarray):
            return {"__array__": [str(value.dtype), list(value.shape), value.tolist()]}
        if isinstance(value, np.generic):
            return value.item()
        raise TypeError(f"{type(value).__name__} in a pool request")
    return json.dumps(payload, sort_keys=True, default=plain)


class RememberingPool:
    """The warm pool, answering a request it has already answered from its first replies.

    The engine servers are deterministic per request (same configuration, same prompts, same
    planted failpoints: bitwise the same dump; engine_server.py), and the group's modules ask the
    same runs (the default prompts' matrix from test_parallel, test_truth_modes, test_two_nodes;
    xdist interleaves the group's modules, so module-scoped caches were rebuilt and asked again).
    A request that raised is not remembered; UNREPEATABLE ones and `fresh=True` always run.
    Callers get copies: no case can change another's reference."""

    def __init__(self, pool: RankPool):
        self.pool = pool
        self.replies: dict[str, list[dict[str, Any]]] = {}
        self.asked = 0  # requests that reached the ranks

    def request(self, payload: dict, *, fresh: bool = False, **kwargs) -> list[dict[str, Any]]:
        key = None if fresh or any(k in payload for k in UNREPEATABLE) else canonical(payload)
        if key is None or key not in self.replies:
            self.asked += 1
            replies = self.pool.request(payload, **kwargs)
            if key is None:
                return replies
            self.replies[key] = replies
        return copy.deepcopy(self.replies[key])

    def __getattr__(self, name: str):
        return getattr(self.pool, name)
