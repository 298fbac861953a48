"""`gate --model DIR` refuses a folder it cannot gate by name, before any case runs, and the
report's per-model section counts what a model's battery did (checked against a hand tally)."""

from __future__ import annotations

import json
import shutil

import pytest

from fixtures.pytest_fixtures import checkpoint_dir
from verifier.__main__ import main
from verifier.render import render
from verifier.report import Case, GateReport, read_json

pytestmark = pytest.mark.gate_area("verifier")


def edited_copy(tmp_path, **changes):
    model = shutil.copytree(checkpoint_dir("qwen3_moe"), tmp_path / "mine")
    raw = json.loads((model / "config.json").read_text())
    raw.update(changes)
    (model / "config.json").write_text(json.dumps(raw))
    return model


@pytest.mark.parametrize("setup, words", [
    ("empty", "no config.json in that folder"),
    ("llama", "field 'model_type': 'llama' is not supported (supported: glm4_moe, qwen3_moe)"),
    ("no_model_type", "field 'model_type': None is not supported"),
    ("bad_heads", "num_key_value_heads"),
], ids=["empty", "llama", "no_model_type", "bad_heads"])
def test_a_folder_the_battery_cannot_gate_is_refused_by_name_before_any_case(tmp_path, capsys, setup, words):
    model = {"empty": lambda: tmp_path, "llama": lambda: edited_copy(tmp_path, model_type="llama"),
             "no_model_type": lambda: edited_copy(tmp_path, model_type=None),
             "bad_heads": lambda: edited_copy(tmp_path, num_key_value_heads=3)}[setup]()
    code = main(["gate", "--model", str(model), "--cases", str(tmp_path / "never-run")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: gate: --model {model}") and words in err, err
    assert len(err.strip().splitlines()) == 1  # one line, before pytest started (no case output)


def battery_case(nodeid, area, outcome="passed", ran=3, failed=0, skip=None, model="/m/a"):
    case = Case(nodeid, area="reference", outcome=outcome, failed_in="call" if outcome == "failed" else None,
                model={"dir": model, "area": area} | ({"skip_reason": skip} if skip else {}))
    case.comparisons["counts"] = {"numeric": {"ran": ran, "failed": failed}}
    return case


def test_the_per_model_section_counts_cases_comparisons_failures_and_skips(tmp_path):
    report = GateReport()
    for case in [battery_case("t::a[a]", "chunked"), battery_case("t::b[a]", "chunked", "failed", 5, 2),
                 battery_case("t::c[a]", "prefix cache", "skipped", 0, skip="not run: no prefix caching"),
                 battery_case("t::d[b]", "truth", model="/m/b"), Case("t::other")]:
        report.add(case)
    # the tally, by hand: model a has 3 cases (8 comparisons, 1 failed, 1 skipped), model b 1
    a, b = report.models()
    assert (a["model"], a["cases"], a["comparisons"], a["failed_cases"], a["skipped"]) == ("/m/a", 3, 8, 1, 1)
    assert [(r["area"], r["cases"], r["failed_comparisons"], r["skipped"]) for r in a["areas"]] == [
        ("chunked", 2, 2, 0), ("prefix cache", 1, 0, 1)]
    assert a["skips"] == [{"nodeid": "t::c[a]", "area": "prefix cache", "reason": "not run: no prefix caching"}]
    assert (b["model"], b["cases"]) == ("/m/b", 1)
    text = render(report)
    assert "Model /m/a: 3 cases, 8 comparisons, 1 failed, 1 skipped" in text
    assert "skipped (prefix cache): not run: no prefix caching" in text
    again = read_json(report.write_json(tmp_path / "r.json"))
    assert again.models() == report.models() and "model" not in json.loads((tmp_path / "r.json").read_text())[
        "cases"][-1]  # a case outside the battery keeps the JSON it had


def test_a_report_without_battery_cases_has_no_model_section():
    report = GateReport()
    report.add(Case("t::x"))
    assert report.models() == [] and "models" not in report.to_dict() and "Model " not in render(report)
