"""Routing replay on 4 ranks (TP4 and TP4+EP4, in graph modes): rank 0 alone writes, each request gets one complete
file holding every MoE layer's full top-k, and the ids match the goldens' expert sets. Every rank
checks each step that all ranks recorded the same ids (a disagreement is a ParallelError).

Both layouts and the planted disagreement run on the warm 4-rank pool of the group
(cases/conftest.py `four_rank_pool`), which builds a fresh engine writing to the case's folder, so
they pay no launch and no Paddle import per rank (a 4-rank CLI job here cost a launcher, four
Paddle imports and a CLI process, about 10 s of CPU). The CLI's writer path on several ranks
(flags, launcher, rank 0's files) is the 2-rank job of cases/conftest.py's `two_rank_routing_job`
(test_routing_writer_rank.py). All on the worker of the other 4-rank cases (never two jobs at once).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from r3_checks import MAX_NEW, NAME, check_goldens, check_tables

from engine.failpoints import Failpoints
from engine.launch import RankJobError
from engine.routing_replay.reader import load_routing

pytestmark = pytest.mark.xdist_group("four_ranks")


# Inside the capture guard, as in the seed's 4-card run: TP4+EP4 full_and_piecewise with every size
# captured at start-up (decode steps replay the whole-step graph); TP4 piecewise with lazy capture (the
# first step, a 119-token prefill, captures size 128 before it replays).
FULL_LAYOUT = {"tp": 4, "ep": 4, "mode": "full_and_piecewise", "capture": "eager", "capture_sizes": [16, 128],
               "decode_capture_sizes": [4]}
POOL_LAYOUT = {"tp": 4, "ep": 1, "mode": "piecewise", "capture_sizes": [16, 128], "decode_capture_sizes": [4]}


def pool_run(pool, faults: Failpoints, prompts, folder: Path, **layout) -> list[dict]:
    """One run of the default prompts on the warm ranks, rank 0 writing routing files to `folder`;
    `faults` (the run's failpoints, plus any the case plants) reach every rank's engine."""
    return pool.request({"checkpoint": NAME, **layout, "prompts": [list(p.input_ids) for p in prompts],
                         "names": [p.name for p in prompts], "max_new_tokens": MAX_NEW,
                         "failpoints": ",".join(sorted(faults.active)), "routing_replay_dir": str(folder)})


def check_folder(folder: Path, prompts, greedy: dict, golden: dict) -> None:
    """One complete file per request, its rows the goldens' expert sets."""
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{p.name}.safetensors" for p in prompts)
    tables = {p.name: load_routing(folder / f"{p.name}.safetensors") for p in prompts}
    outputs = [SimpleNamespace(greedy=[int(t) for t in greedy[p.name]]) for p in prompts]
    cfg = SimpleNamespace(moe_layers=tables[prompts[0].name].moe_layers, top_k=tables[prompts[0].name].top_k)
    assert check_tables(tables, prompts, MAX_NEW, cfg.moe_layers, cfg.top_k) == []
    assert check_goldens(tables, prompts, outputs, golden, cfg.moe_layers) == []


def test_four_ranks_write_one_complete_file_per_request(four_rank_pool, faults, prompts, golden, tmp_path):
    """TP4+EP4, whole-step graphs captured at start-up, on the warm ranks."""
    folder = tmp_path / "r3"
    replies = pool_run(four_rank_pool, faults, prompts, folder, **FULL_LAYOUT)
    check_folder(folder, prompts, {p.name: replies[0][f"greedy_p{i}"] for i, p in enumerate(prompts)}, golden(NAME))


def test_pool_ranks_write_one_complete_file_per_request(four_rank_pool, faults, prompts, golden, tmp_path):
    """TP4 piecewise with lazy capture, on the warm ranks: only rank 0 writes, so the folder holds
    one file per request whichever rank's dump is read."""
    folder = tmp_path / "r3"
    replies = pool_run(four_rank_pool, faults, prompts, folder, **POOL_LAYOUT)
    check_folder(folder, prompts, {p.name: replies[0][f"greedy_p{i}"] for i, p in enumerate(prompts)}, golden(NAME))


def test_ranks_that_record_different_ids_are_an_error(four_rank_pool, tmp_path, faults, prompts):
    """Planted: rank 1 records other ids (and the run's failpoints reach every rank too). The
    per-step check names the disagreement; no file is left."""
    folder = tmp_path / "r3"
    with pytest.raises(RankJobError, match="ranks disagree on the step's routed expert ids"):
        pool_run(four_rank_pool, faults.with_(Failpoints.parse("r3.rank_skews_ids")), prompts, folder,
                 tp=4, ep=1, mode="eager")
    assert not folder.exists() or list(folder.iterdir()) == []
