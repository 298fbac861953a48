"""merge-reports on synthetic shard reports (verifier/merge.py, verifier/cli_merge.py).

Each case writes the shard reports of a made-up 3-shard run whose collection, partition and
outcomes are chosen here, then runs `python -m verifier merge-reports` in-process. Expected counts,
verdicts and exit codes come from that construction, not from the merge.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

from verifier.__main__ import main
from verifier.report import Case, GateReport

pytestmark = pytest.mark.gate_area("verifier")

COLLECTION = [f"cases/test_m.py::test_case[{k}]" for k in range(9)]
PARTS = [COLLECTION[0:4], COLLECTION[4:7], COLLECTION[7:9]]  # shard i+1 of 3 runs PARTS[i]
FAILED = COLLECTION[5]
FAILURE = {"name": "logits", "passed": False, "message": "logits: 1 of 6 mismatched", "tolerance": "rtol=1e-05, atol=1e-05",
           "tolerance_source": "verifier/tolerance.py, float32 row", "dtype": "float32", "shape": [2, 3],
           "mismatches": 1, "total": 6, "max_abs_err": 0.5, "max_abs_index": [1, 2], "max_rel_err": 0.1,
           "max_rel_index": [1, 2], "first_mismatch_index": [1, 2], "rel_l2": 0.05}


def _case(nodeid: str, outcome: str = "passed") -> Case:
    case = Case(nodeid, area="verifier", outcome=outcome, duration=0.25)
    case.comparisons["counts"] = {"numeric": {"ran": 2, "failed": int(outcome == "failed")}}
    if outcome == "failed":
        case.failed_in, case.message = "call", "AssertionError: logits diverged"
        case.comparisons["failures"] = [dict(FAILURE)]
        case.reproduce = f"python -m pytest '{nodeid}'"
    return case


def write_shards(folder, parts=PARTS, outcomes=None, extra=None):
    """One report per part; `outcomes` {nodeid: outcome}; `extra` {shard index: [Case]} appended."""
    paths = []
    for index, part in enumerate(parts, 1):
        report = GateReport(command=["cases", "--shard", f"{index}/{len(parts)}"],
                            shard={"index": index, "count": len(parts), "collected": sorted(COLLECTION),
                                   "selected": sorted(part)})
        for nodeid in part:
            report.add(_case(nodeid, (outcomes or {}).get(nodeid, "passed")))
        for case in (extra or {}).get(index, []):
            report.add(case)
        paths.append(str(report.write_json(folder / f"shard-{index}.json")))
    return paths


def merge_reports(capsys, folder, paths):
    """(exit code, console text, merged JSON)."""
    out = folder / "merged.json"
    code = main(["merge-reports", *paths, "--json", str(out), "--junitxml", str(folder / "merged.xml"),
                 "--html", str(folder / "merged.html")])
    return code, capsys.readouterr().out, json.loads(out.read_text())


def test_every_case_once_and_passing_merges_to_a_pass(tmp_path, capsys):
    code, console, merged = merge_reports(capsys, tmp_path, write_shards(tmp_path))
    assert code == 0 and merged["verdict"] == "pass", console
    assert [c["nodeid"] for c in merged["cases"]] == sorted(COLLECTION)
    assert merged["totals"]["passed"] == len(COLLECTION) and sum(merged["totals"].values()) == len(COLLECTION)
    assert merged["areas"] == [{"area": "verifier", "cases": 9, "comparisons": 18, "failed_comparisons": 0,
                                "failed_cases": 0, "near_ties": 0}]
    assert "graphgate: PASS  (9 passed, 0 failed, 0 errors, 0 skipped)" in console


def test_a_failure_in_one_shard_is_a_divergence_with_its_panel_kept(tmp_path, capsys):
    code, console, merged = merge_reports(capsys, tmp_path, write_shards(tmp_path, outcomes={FAILED: "failed"}))
    assert code == 1 and merged["verdict"] == "divergence"
    assert merged["totals"] == {"passed": 8, "failed": 1, "error": 0, "skipped": 0, "xfailed": 0, "xpassed": 0}
    [case] = [c for c in merged["cases"] if c["outcome"] == "failed"]
    assert case["nodeid"] == FAILED and case["comparisons"]["failures"] == [FAILURE]
    assert case["reproduce"] == f"python -m pytest '{FAILED}'"
    assert "FAILED" in console and FAILED in console and "token 1, channel 2" in console  # the panel
    assert f"reproduce: python -m pytest '{FAILED}'" in console
    suite = ET.parse(tmp_path / "merged.xml").getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("9", "1", "0")
    assert "token 1, channel 2" in (tmp_path / "merged.html").read_text()


def test_a_case_that_could_not_run_in_one_shard_makes_the_merge_could_not_run(tmp_path, capsys):
    code, _, merged = merge_reports(capsys, tmp_path, write_shards(tmp_path, outcomes={COLLECTION[8]: "error"}))
    assert code == 2 and merged["verdict"] == "could not run"


def test_a_case_no_shard_ran_is_named_missing(tmp_path, capsys):
    parts = [PARTS[0], PARTS[1][:-1], PARTS[2]]  # shard 2 selected COLLECTION[6] but has no entry for it
    paths = write_shards(tmp_path, parts=parts)
    data = json.loads(open(paths[1]).read())
    data["shard"]["selected"] = sorted(PARTS[1])
    open(paths[1], "w").write(json.dumps(data))
    code, console, merged = merge_reports(capsys, tmp_path, paths)
    assert code == 2
    [missing] = [c for c in merged["cases"] if c["outcome"] == "error"]
    assert missing["nodeid"] == COLLECTION[6] and "missing" in missing["message"]
    assert "shard-2.json (shard 2/3) selected it but has no entry for it" in missing["message"]
    assert COLLECTION[6] in console and "missing" in console
    assert len(merged["cases"]) == len(COLLECTION)


def test_a_case_two_shards_ran_is_named_duplicated(tmp_path, capsys):
    parts = [PARTS[0], PARTS[1] + [COLLECTION[0]], PARTS[2]]
    code, console, merged = merge_reports(capsys, tmp_path, write_shards(tmp_path, parts=parts))
    assert code == 2 and len(merged["cases"]) == len(COLLECTION), "a duplicate is one entry, filed as an error"
    [dup] = [c for c in merged["cases"] if c["outcome"] == "error"]
    assert dup["nodeid"] == COLLECTION[0] and "duplicated" in dup["message"]
    assert "shard-1.json" in dup["message"] and "shard-2.json" in dup["message"]


def test_a_failure_still_wins_over_a_missing_case(tmp_path, capsys):
    parts = [PARTS[0], PARTS[1], PARTS[2][:1]]
    code, _, merged = merge_reports(capsys, tmp_path, write_shards(tmp_path, parts=parts, outcomes={FAILED: "failed"}))
    assert code == 1 and merged["totals"]["failed"] == 1 and merged["totals"]["error"] == 1


def _damage(path, how):
    text = open(path).read()
    if how == "truncated":
        open(path, "w").write(text[: len(text) // 2])
    elif how == "unsharded":
        data = json.loads(text)
        del data["shard"]
        open(path, "w").write(json.dumps(data))
    elif how == "other schema":
        open(path, "w").write(json.dumps(dict(json.loads(text), version=99)))
    elif how == "bad shard field":
        data = json.loads(text)
        data["shard"]["collected"] = "everything"
        open(path, "w").write(json.dumps(data))


@pytest.mark.parametrize("how, why", [("truncated", "not JSON"), ("unsharded", "no 'shard' field"),
                                      ("other schema", "not a graphgate.report v"),
                                      ("bad shard field", "shard.collected"), ("absent", "no such file")])
def test_a_damaged_or_missing_report_is_named_with_what_is_wrong(tmp_path, capsys, how, why):
    paths = write_shards(tmp_path)
    if how == "absent":
        (tmp_path / "shard-2.json").unlink()
    else:
        _damage(paths[1], how)
    code, console, merged = merge_reports(capsys, tmp_path, paths)
    assert code == 2 and merged["verdict"] == "could not run"
    problem = next(c for c in merged["cases"] if c["nodeid"] == paths[1])
    assert problem["outcome"] == "error" and why in problem["message"], problem["message"]
    assert "shard 2/3" in {c["nodeid"] for c in merged["cases"]}, "the absent shard is named too"
    missing = {c["nodeid"] for c in merged["cases"] if "in no shard report" in c["message"]}
    assert missing == set(PARTS[1]), "its cases are named as missing"
    assert paths[1] in console


def test_a_shard_given_twice_or_of_another_split_is_named(tmp_path, capsys):
    paths = write_shards(tmp_path)
    (tmp_path / "four").mkdir()
    other = write_shards(tmp_path / "four", parts=PARTS + [[]])  # its shard 4/4 does not belong here
    code, _, merged = merge_reports(capsys, tmp_path, [paths[0], paths[1], paths[1], paths[2], other[3]])
    assert code == 2
    messages = [c["message"] for c in merged["cases"] if c["nodeid"] in (paths[1], other[3])]
    assert any("repeated" in m for m in messages) and any("another split" in m for m in messages), messages
    assert sum(c["outcome"] == "passed" for c in merged["cases"]) == len(COLLECTION)


def test_a_collection_error_every_shard_saw_is_kept_once(tmp_path, capsys):
    broken = Case("cases/test_broken.py", area="other", outcome="error", failed_in="collection",
                  message="ImportError: no module named nothing")
    extra = {i: [Case(**vars(broken))] for i in (1, 2, 3)}
    code, _, merged = merge_reports(capsys, tmp_path, write_shards(tmp_path, extra=extra))
    assert code == 2 and merged["totals"]["error"] == 1
    [kept] = [c for c in merged["cases"] if c["nodeid"] == "cases/test_broken.py"]
    assert (kept["failed_in"], kept["message"]) == ("collection", broken.message), "kept as it was, not re-filed"


def test_the_workflow_merges_exactly_the_reports_its_matrix_writes():
    """.github/workflows/gate.yml: N matrix shards, each `gate --shard I/N`, and a merge job after
    all of them (even failed ones) naming every shard's report, so an absent one is reported."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / ".github/workflows/gate.yml").read_text()
    shards = [int(k) for k in re.search(r"^\s+shard: \[([\d, ]+)\]", text, re.M)[1].split(",")]
    count = len(shards)
    assert shards == list(range(1, count + 1)) and count > 1
    assert f"--shard ${{{{ matrix.shard }}}}/{count}" in text
    assert "--json shard-report/shard-${{ matrix.shard }}.json" in text
    merge = text[text.index("  gate-merge:"):]
    assert "needs: gate-shard" in merge and re.search(r"^\s+if: always\(\)", merge, re.M)
    named = re.findall(r"shard-reports/shard-(\d+)\.json", merge)
    assert sorted(map(int, named)) == shards, named


def test_a_shard_with_nothing_to_run_passes_but_an_empty_collection_does_not():
    def verdict(collected, selected):
        return GateReport(shard={"index": 2, "count": 2, "collected": collected, "selected": selected}).verdict()

    assert verdict(COLLECTION, []) == "pass"  # more shards than units: this one's part is empty
    assert verdict([], []) == "could not run"  # nothing was collected at all
    assert GateReport().verdict() == "could not run"  # an unsharded run with no case
