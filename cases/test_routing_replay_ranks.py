"""Routing replay on 4 ranks (TP4 and TP4+EP4, in graph modes): rank 0 alone writes, each request gets one complete
file holding every MoE layer's full top-k, and the ids match the goldens' expert sets. Every rank
checks each step that all ranks recorded the same ids (a disagreement is a ParallelError).

Runs the CLI as a real 4-rank job, on the worker of the other 4-rank cases (never two jobs at once).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from engine_cli import ROOT, engine_env, engine_run
from test_routing_replay_engine import MAX_NEW, NAME, check_goldens, check_tables

from engine.failpoints import Failpoints
from engine.routing_replay.reader import load_routing
from fixtures.pytest_fixtures import PROMPTS, checkpoint_dir

pytestmark = pytest.mark.xdist_group("four_ranks")


def run_job(faults: Failpoints, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """The CLI as a real job with `faults` (the run's failpoints, plus any the case plants) on every rank."""
    command = engine_run(faults, checkpoint_dir(NAME), "--prompts", PROMPTS, "--max-new-tokens", MAX_NEW,
                         "--log-dir", tmp_path / "logs", *args)
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600, env=engine_env())


# Inside the capture guard, as in the seed's 4-card run: TP4 piecewise with lazy capture (the first
# step, a 119-token prefill, captures size 128 before it replays), TP4+EP4 full_and_piecewise with
# every size captured at start-up (decode steps replay the whole-step graph).
GRAPHS = ["--capture-sizes", "16,128", "--decode-capture-sizes", "4"]
LAYOUTS = {"tp4_piecewise_lazy": ["--tp", "4", "--graph", "piecewise", *GRAPHS],
           "tp4_ep4_full_eager": ["--tp", "4", "--ep", "4", "--graph", "full_and_piecewise", "--capture", "eager", *GRAPHS]}


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_four_ranks_write_one_complete_file_per_request(faults, prompts, golden, tmp_path, layout):
    folder = tmp_path / "r3"
    job = run_job(faults, [*layout, "--routing-replay-dir", str(folder)], tmp_path)
    assert job.returncode == 0, job.stderr
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{p.name}.safetensors" for p in prompts)
    tables = {p.name: load_routing(folder / f"{p.name}.safetensors") for p in prompts}
    greedy = dict(line.split(": ") for line in job.stdout.splitlines() if ": " in line)
    outputs = [SimpleNamespace(greedy=[int(t) for t in greedy[p.name].split()]) for p in prompts]
    cfg = SimpleNamespace(moe_layers=tables[prompts[0].name].moe_layers, top_k=tables[prompts[0].name].top_k)
    assert check_tables(tables, prompts, MAX_NEW, cfg.moe_layers, cfg.top_k) == []
    assert check_goldens(tables, prompts, outputs, golden(NAME), cfg.moe_layers) == []


def test_ranks_that_record_different_ids_are_an_error(tmp_path, faults):
    """Planted: rank 1 records other ids (and the run's failpoints reach every rank too). The
    per-step check names the disagreement; no file is left."""
    folder = tmp_path / "r3"
    job = run_job(faults.with_(Failpoints.parse("r3.rank_skews_ids")), ["--tp", "4", "--routing-replay-dir", str(folder)],
                  tmp_path)
    assert job.returncode != 0
    assert "ranks disagree on the step's routed expert ids" in job.stderr
    assert not folder.exists() or list(folder.iterdir()) == []
