"""The battery fails on a planted fault in each area, as the fixtures' cases do.

Each case copies a bundled fixture into a folder of another name (so nothing can recognise it by
path), plants one failpoint and runs `python -m verifier gate --model COPY --failpoints NAME` on
the battery's cases of one area (`-- -k`), as a user would. The gate must exit 1 (a divergence,
not "could not run"), and every case that did not pass must be a failed case of that area in the
report's per-model section. The capture lint has no failpoint: its case plants `nonzero` in the
router (as test_capture_lint.py does) and calls the battery's lint case in this process.

About 2.5 minutes on 2 cores: not part of the default gate (cases/conftest.py collects this file only
when it is named on the command line): `pytest cases/test_model_battery_selftest.py`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import paddle
import pytest
from engine_cli import ROOT, engine_env

import engine.moe.router as router_module
from fixtures.pytest_fixtures import checkpoint_dir

# (battery area, fixture copied, failpoint, the battery's cases run: pytest -k)
PLANTED = [
    ("graph vs eager", "qwen3_moe", "graph.stale_padding", "replays and piecewise and not full"),
    ("chunked", "qwen3_moe", "attention.drop_cached_prefix", "chunks_of_7"),
    ("moe forms", "glm4_moe_nobias", "router.bias_absent_crash", "sparse_form"),
    ("ranks", "qwen3_moe", "dist.skip_allreduce", "four_ranks and tp4-eager"),
    ("routing replay", "qwen3_moe", "r3.skip_in_graph", "graph_recording and piecewise and not full"),
    ("routing replay", "qwen3_moe", "r3.replay_layer_off_by_one", "replaying_a_run"),
    ("config liveness", "qwen3_moe", "router.skip_renorm", "live and norm_topk_prob"),
    ("goldens", "qwen3_moe", "router.skip_renorm", "transformers"),
    ("truth", "qwen3_moe", "graph.stale_positions", "truth and piecewise and not full"),
    ("prefix cache", "qwen3_moe", "prefix.routing_rows_missing", "prefix_cache_hit and eager and sparse"),
    ("prefix cache", "qwen3_moe", "prefix.key_ignores_replay", "prefix_cache_keeps"),
]


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    """copies(fixture) -> a copy of the bundled checkpoint under a name the gate has never seen."""
    root = tmp_path_factory.mktemp("user-models")
    return lambda name: shutil.copytree(checkpoint_dir(name), root / f"user_{name}", dirs_exist_ok=True)


@pytest.mark.parametrize("battery_area,fixture,failpoint,selection", PLANTED,
                         ids=[f"{a}-{f}" for a, _, f, _ in PLANTED])
def test_a_planted_fault_fails_its_area_of_the_battery(copies, tmp_path, battery_area, fixture, failpoint, selection):
    model, report_path = copies(fixture), tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "verifier", "gate", "-n", "0", "--model", str(model),
                           "--failpoints", failpoint, "--cases", str(ROOT / "cases" / "test_user_model.py"),
                           "--json", str(report_path), "--", "-k", selection],
                          cwd=ROOT, env=engine_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(report_path.read_text())
    not_passed = [c for c in report["cases"] if c["outcome"] != "passed"]
    assert not_passed and all(c["outcome"] == "failed" and c["model"]["area"] == battery_area for c in not_passed), \
        [(c["nodeid"], c["outcome"], c["message"][:200]) for c in not_passed]
    (section,) = report["models"]
    assert section["model"] == str(model.resolve()) and section["failed_cases"] == len(not_passed)
    assert [a["area"] for a in section["areas"] if a["failed_cases"]] == [battery_area]


def test_a_capture_hazard_planted_in_the_router_fails_the_lint_area(copies, monkeypatch):
    from test_user_model import test_pieces_have_no_capture_finding

    model = str(copies("qwen3_moe").resolve())
    test_pieces_have_no_capture_finding(model, "tp1")  # clean first: the check passes unplanted
    monkeypatch.setattr(router_module, "nonfinite_rows", lambda logits, num_real: paddle.nonzero(logits > 0)[:, 0] > 0)
    with pytest.raises(AssertionError, match="data-dependent-shape"):
        test_pieces_have_no_capture_finding(model, "tp1")
