"""`python -m verifier compare A.npz B.npz --truth T.npz`: exit codes, the panel's words, the JSON.

Synthetic dumps (engine/dump.py keys) around a float64 truth; the expected errors are computed
here in NumPy, the expected words from the error ratio the case planted.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from verifier.__main__ import main

pytestmark = pytest.mark.gate_area("verifier")

VOCAB, EXPERTS, TOP_K = 64, 8, 2


def truth_dump() -> dict[str, np.ndarray]:
    """Two prompts in float64, each greedy step's winner 1.0 clear, routing with deciding values."""
    rng = np.random.default_rng(11)
    arrays = {"names": np.asarray(["a", "b"]), "topk_margin_grouping": np.array([1, 1])}
    for i, length in enumerate((5, 9)):
        greedy_logits = rng.standard_normal((3, VOCAB))
        greedy = rng.integers(0, VOCAB, 3)
        greedy_logits[np.arange(3), greedy] = greedy_logits.max(-1) + 1.0
        values = rng.standard_normal((length, EXPERTS))
        arrays |= {f"input_ids_p{i}": rng.integers(0, VOCAB, length), f"logits_p{i}": rng.standard_normal((length, VOCAB)),
                   f"greedy_p{i}": greedy, f"greedy_logits_p{i}": greedy_logits,
                   f"topk_ids_p{i}_layer1": np.sort(np.argsort(-values, -1)[:, :TOP_K], -1),
                   f"topk_margin_p{i}_layer1": values}
    return arrays


def run_of(truth: dict, rel_error: float, seed: int, scale: dict[str, float] | None = None) -> dict:
    """A float32 dump `rel_error` (rel L2) from the truth on every float key (times `scale[key]`)."""
    rng = np.random.default_rng(seed)
    run = {k: v.copy() for k, v in truth.items() if not k.startswith("topk_margin")}
    for key in [k for k in truth if k.startswith(("logits_p", "greedy_logits_p"))]:
        t, d = truth[key], rng.standard_normal(truth[key].shape)
        size = rel_error * (scale or {}).get(key, 1.0)
        run[key] = (t + d * size * np.linalg.norm(t) / np.linalg.norm(d)).astype(np.float32)
    return run


def rel_error(run: dict, truth: dict, key: str) -> float:
    return float(np.linalg.norm(run[key].astype(np.float64) - truth[key]) / np.linalg.norm(truth[key]))


def compare(tmp_path: Path, capsys, a: dict, b: dict, truth: dict, *extra: str) -> tuple[int, str, str]:
    paths = []
    for name, arrays in (("a", a), ("b", b), ("t", truth)):
        np.savez(tmp_path / f"{name}.npz", **arrays)
        paths.append(str(tmp_path / f"{name}.npz"))
    code = main(["compare", paths[0], paths[1], "--truth", paths[2], *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


def flat(text: str) -> str:
    """The report with panel borders and line breaks gone: a wrapped sentence reads whole again."""
    return " ".join(text.replace("|", " ").split())


def test_runs_within_noise_agree_and_show_both_errors(tmp_path, capsys):
    truth = truth_dump()
    a, b = run_of(truth, 2e-4, 1), run_of(truth, 1e-4, 2)
    code, out, _ = compare(tmp_path, capsys, a, b, truth)
    assert code == 0, out
    assert "Against the float64 truth" in out
    want = f"within noise: {rel_error(a, truth, 'logits_p1') / rel_error(b, truth, 'logits_p1'):.2g} times the reference's error"
    assert want in flat(out), out


def test_a_run_far_worse_than_the_reference_fails_with_the_ratio_in_words_and_in_json(tmp_path, capsys):
    truth = truth_dump()
    a, b = run_of(truth, 1e-4, 1, scale={"logits_p1": 4.1e4 / 1e0}), run_of(truth, 1e-4, 2)
    code, out, _ = compare(tmp_path, capsys, a, b, truth, "--json", str(tmp_path / "r.json"))
    times = rel_error(a, truth, "logits_p1") / rel_error(b, truth, "logits_p1")
    assert code == 1
    text = flat(out)
    assert "FAILED" in out and f"bug: {times:.1e}".replace("e+0", "e") + " times the reference's error" in text, text
    [case] = json.loads((tmp_path / "r.json").read_text())["cases"]
    [row] = [r for r in case["comparisons"]["truth"] if r["key"] == "logits_p1"]
    assert row["actual_error"] == pytest.approx(rel_error(a, truth, "logits_p1"), rel=1e-12)
    assert row["reference_error"] == pytest.approx(rel_error(b, truth, "logits_p1"), rel=1e-12)
    assert row["passed"] is False and row["verdict"].startswith("bug: ")
    assert [f["name"] for f in case["comparisons"]["failures"]] == ["logits_p1"]


def test_a_decisive_expert_flip_names_the_wrong_side_and_the_margin(tmp_path, capsys):
    truth = truth_dump()
    values = truth["topk_margin_p1_layer1"][4]
    order = np.argsort(-values)
    a, b = run_of(truth, 1e-4, 1), run_of(truth, 1e-4, 2)
    b["topk_ids_p1_layer1"][4] = np.sort([order[0], order[TOP_K]])  # B drops the k-th for the next
    gap = values[order[TOP_K - 1]] - values[order[TOP_K]]
    code, out, _ = compare(tmp_path, capsys, a, b, truth, "--json", str(tmp_path / "r.json"))
    text = flat(out)
    assert code == 1
    assert "topk_ids_p1_layer1 row 4" in text and "bug: B (the reference) disagrees with the truth" in text, text
    assert f"expert values gap {gap:.3g}" in text
    [flip] = [r for r in json.loads((tmp_path / "r.json").read_text())["cases"][0]["comparisons"]["truth"]
              if r["kind"] == "flip"]
    assert (flip["position"], flip["wrong"], flip["margin"]) == (4, "reference", pytest.approx(gap))


def test_a_token_flip_within_noise_passes_and_is_listed_with_its_margin(tmp_path, capsys):
    truth = truth_dump()
    right = int(truth["greedy_p0"][1])
    other = (right + 1) % VOCAB
    truth["greedy_logits_p0"][1, other] = truth["greedy_logits_p0"][1, right] - 1e-6  # under TOKEN_NEAR_TIE
    a, b = run_of(truth, 1e-4, 1), run_of(truth, 1e-4, 2)
    a["greedy_p0"][1:] = other
    code, out, _ = compare(tmp_path, capsys, a, b, truth)
    text = flat(out)
    assert code == 0, text
    assert "greedy_p0 step 1" in text and "within noise: the truth's logits gap 1e-06" in text


@pytest.mark.parametrize("spoil, words", [
    (lambda t: t.update(logits_p0=t["logits_p0"].astype(np.float32)), "not float64"),
    (lambda t: t.pop("greedy_logits_p1"), "lacks"),
    (lambda t: t.update(input_ids_p1=t["input_ids_p1"][::-1].copy()), "same prompts"),
])
def test_a_truth_of_wrong_keys_dtype_or_prompts_exits_2_naming_it(tmp_path, capsys, spoil, words):
    truth = truth_dump()
    a, b = run_of(truth, 1e-4, 1), run_of(truth, 1e-4, 2)
    spoil(truth)
    code, out, err = compare(tmp_path, capsys, a, b, truth)
    assert (code, out) == (2, "") and err.startswith("error: ") and words in err


def test_an_unreadable_truth_exits_2(tmp_path, capsys):
    truth = truth_dump()
    np.savez(tmp_path / "a.npz", **run_of(truth, 1e-4, 1))
    (tmp_path / "t.npz").write_bytes(b"not a zip")
    code = main(["compare", str(tmp_path / "a.npz"), str(tmp_path / "a.npz"), "--truth", str(tmp_path / "t.npz")])
    assert code == 2 and "t.npz: not a readable .npz dump" in capsys.readouterr().err


def test_a_gate_case_failing_against_the_truth_shows_both_errors_in_its_panel():
    """What a gate case records through verifier.truth.assert_truth reaches its failure panel:
    A's and B's errors against the truth, the words, and every flip of the key with its margin."""
    from verifier.recording import recording
    from verifier.render import render
    from verifier.report import Case, GateReport
    from verifier.truth import assert_truth

    truth = truth_dump()
    a, b = run_of(truth, 1e-4, 1, scale={"logits_p0": 100.0}), run_of(truth, 1e-4, 2)
    values = truth["topk_margin_p0_layer1"][2]
    order = np.argsort(-values)
    a["topk_ids_p0_layer1"][2] = np.sort([order[0], order[-1]])  # the worst expert for the k-th
    with recording() as recorder, pytest.raises(AssertionError, match="2 divergence"):
        assert_truth(a, b, truth)
    report = GateReport()
    report.add(Case("cases/x.py::y", area="verifier", outcome="failed", failed_in="call",
                    comparisons=recorder.to_dict()))
    text = flat(render(report))
    err_a, err_b = rel_error(a, truth, "logits_p0"), rel_error(b, truth, "logits_p0")
    assert f"logits_p0: A {err_a:.3g}, B {err_b:.3g} against the truth: bug: {err_a / err_b:.0f} times" in text, text
    assert "topk_ids_p0_layer1 row 2: A chose" in text and "bug: A (the run under test) disagrees" in text
    assert f"expert values gap {values[order[TOP_K - 1]] - values[order[-1]]:.3g}" in text
