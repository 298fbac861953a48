"""The warm 4-rank engine-server job that the 4-rank cases share (cases/conftest.py's
`four_rank_pool`), and how to start another one."""

from __future__ import annotations

from pathlib import Path

from verifier.rank_pool import RankPool

ROOT = Path(__file__).resolve().parent.parent
SERVER = str(ROOT / "cases" / "rank_programs" / "engine_server.py")


def start_pool(**timeouts) -> RankPool:
    """4 ranks of cases/rank_programs/engine_server.py; `timeouts` as RankPool takes them."""
    return RankPool([SERVER], 4, env={"PYTHONPATH": str(ROOT)}, **timeouts)
