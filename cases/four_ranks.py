"""The warm 4-rank engine-server job that the 4-rank cases share (cases/conftest.py's
`four_rank_pool`), and how to start another one."""

from __future__ import annotations

from pathlib import Path

from engine.failpoints import Failpoints
from verifier.rank_pool import RankPool

ROOT = Path(__file__).resolve().parent.parent
SERVER = str(ROOT / "cases" / "rank_programs" / "engine_server.py")


def start_pool(faults: Failpoints, **timeouts) -> RankPool:
    """4 ranks of cases/rank_programs/engine_server.py planting `faults` (the run's `--failpoints`)
    in every engine they build; `timeouts` as RankPool takes them."""
    return RankPool([SERVER], 4, failpoints=faults, env={"PYTHONPATH": str(ROOT)}, **timeouts)
