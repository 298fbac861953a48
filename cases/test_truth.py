"""The verdict against a float64 truth (verifier/truth.py), checked against an independent restatement.

A synthetic truth T (float64) and two runs A = T + e_A, B = T + e_B with errors of controlled
size and direction, and flips placed at controlled truth margins. The expected verdict comes from
the rule restated here in NumPy (rel L2 per key; max(ratio x B's, floor); a choice is admissible
when the truth's best beats it by at most atol + rtol * max(|values|)), never from verifier/truth.py.
The bounds themselves (TRUTH_RATIO, TRUTH_FLOOR, the near-tie pairs) are data from tolerance.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from verifier.tolerance import NEAR_TIE, TOKEN_NEAR_TIE, TRUTH_FLOOR, TRUTH_RATIO
from verifier.truth import TruthError, judge

VOCAB, EXPERTS, TOP_K, STEPS, TOKENS = 64, 8, 2, 4, 6
# B's error in the ratio suites: far above floor / ratio, so the ratio (not the floor) decides.
REFERENCE_ERROR = 1e-4

pytestmark = pytest.mark.gate_area("verifier")


def truth_dump(seed: int) -> dict[str, np.ndarray]:
    """One prompt in float64: logits, greedy tokens chosen from greedy logits (each step's winner
    1.0 above the rest, so only placed flips are close), routing with deciding values."""
    rng = np.random.default_rng(seed)
    greedy_logits = rng.standard_normal((STEPS, VOCAB))
    greedy = rng.integers(0, VOCAB, STEPS)
    greedy_logits[np.arange(STEPS), greedy] = greedy_logits.max(-1) + 1.0
    values = rng.standard_normal((TOKENS, EXPERTS))
    ids = np.sort(np.argsort(-values, -1)[:, :TOP_K], -1)
    return {"input_ids_p0": rng.integers(0, VOCAB, TOKENS), "logits_p0": rng.standard_normal((TOKENS, VOCAB)),
            "greedy_p0": greedy, "greedy_logits_p0": greedy_logits,
            "topk_ids_p0_layer1": ids, "topk_margin_p0_layer1": values,
            "topk_margin_grouping": np.array([1, 1])}


def perturbed(truth: dict, rel_error: float, seed: int) -> dict[str, np.ndarray]:
    """A float32 run whose every float key is `rel_error` (rel L2) from the truth, in a random direction."""
    rng = np.random.default_rng(seed)
    run = {k: v.copy() for k, v in truth.items() if not k.startswith("topk_margin")}
    for key in ("logits_p0", "greedy_logits_p0"):
        t = truth[key]
        direction = rng.standard_normal(t.shape)
        run[key] = (t + direction * rel_error * np.linalg.norm(t) / np.linalg.norm(direction)).astype(np.float32)
    return run


def oracle_fails(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> bool:
    """The float rule restated: A's rel L2 to T over max(ratio x B's, floor)."""
    err = lambda x: np.linalg.norm(x.astype(np.float64) - t) / np.linalg.norm(t)  # noqa: E731
    return bool(err(a) > max(TRUTH_RATIO * err(b), TRUTH_FLOOR))


def admissible(values: np.ndarray, chosen: list[int], k: int, rule) -> bool:
    """A top-k choice (one group) is admissible when no expert left out beats a chosen one by more
    than the rule's atol + rtol * max(|first|, |second|) (brute force over the pairs)."""
    for y in set(range(len(values))) - set(chosen):
        for x in chosen:
            gap = values[y] - values[x]
            if gap > 0 and gap > rule.atol + rule.rtol * max(abs(values[y]), abs(values[x])):
                return False
    return len(set(chosen)) == k


# ------------------------------------------------------------------------------ float keys


@given(seed=st.integers(0, 2**16), factor=st.floats(0.0, 2.0))
def test_a_run_up_to_twice_the_reference_error_passes(seed, factor):
    truth = truth_dump(seed)
    a, b = perturbed(truth, factor * REFERENCE_ERROR, seed + 1), perturbed(truth, REFERENCE_ERROR, seed + 2)
    verdict = judge(a, b, truth)
    assert verdict.passed, verdict.failures()


@given(seed=st.integers(0, 2**16), factor=st.floats(10.0, 1e4))
def test_a_run_ten_times_the_reference_error_fails_on_every_float_key(seed, factor):
    truth = truth_dump(seed)
    a, b = perturbed(truth, factor * REFERENCE_ERROR, seed + 1), perturbed(truth, REFERENCE_ERROR, seed + 2)
    verdict = judge(a, b, truth)
    assert sorted(v.key for v in verdict.floats if not v.passed) == ["greedy_logits_p0", "logits_p0"]
    assert all(v.words().startswith("bug: ") and "times the reference's error" in v.words() for v in verdict.floats)


@given(seed=st.integers(0, 2**16), a_error=st.floats(0.0, 2e-3), b_error=st.floats(0.0, 2e-4))
def test_float_verdicts_agree_with_the_restated_rule(seed, a_error, b_error):
    truth = truth_dump(seed)
    a, b = perturbed(truth, a_error, seed + 1), perturbed(truth, b_error, seed + 2)
    verdict = judge(a, b, truth)
    for v in verdict.floats:
        assert v.passed == (not oracle_fails(a[v.key], b[v.key], truth[v.key])), v.words()
        want_a = np.linalg.norm(a[v.key].astype(np.float64) - truth[v.key]) / np.linalg.norm(truth[v.key])
        assert v.actual_error == pytest.approx(want_a, rel=1e-12)


@given(seed=st.integers(0, 2**16), share=st.floats(0.0, 0.5))
def test_an_exact_reference_falls_back_on_the_floor(seed, share):
    truth = truth_dump(seed)
    exact = {k: v for k, v in truth.items() if not k.startswith("topk_margin")}  # B is T itself: error 0
    honest = judge(perturbed(truth, share * TRUTH_FLOOR, seed + 1), exact, truth)
    broken = judge(perturbed(truth, (2 + share) * TRUTH_FLOOR, seed + 1), exact, truth)
    assert honest.passed and all(v.reference_error == 0 for v in honest.floats)
    assert all("the reference is exact" in v.words() for v in honest.floats + broken.floats)
    assert not any(v.passed for v in broken.floats)


def test_a_nan_in_a_fails_whatever_the_reference():
    truth = truth_dump(1)
    a, b = perturbed(truth, 0.0, 2), perturbed(truth, REFERENCE_ERROR, 3)
    a["logits_p0"][2, 5] = np.nan
    assert [v.key for v in judge(a, b, truth).floats if not v.passed] == ["logits_p0"]


# ------------------------------------------------------------------------------ token flips


def token_case(seed: int, step: int, gap: float, a_wrong: bool):
    """T's step `step` is won by token `right` over `other` by `gap`; the wrong side picks `other`
    (and so it continues: later steps of A and B are unrelated, never judged)."""
    truth = truth_dump(seed)
    logits = truth["greedy_logits_p0"]
    right = int(truth["greedy_p0"][step])
    other = (right + 1) % VOCAB
    logits[step, other] = logits[step, right] - gap
    good, bad = perturbed(truth, 0.0, seed + 1), perturbed(truth, 0.0, seed + 2)
    bad["greedy_p0"][step:] = other
    return (bad, good, truth, right, other) if a_wrong else (good, bad, truth, right, other)


def oracle_token_noise(values: np.ndarray, a: int, b: int) -> bool:
    return admissible(values, [a], 1, TOKEN_NEAR_TIE) and admissible(values, [b], 1, TOKEN_NEAR_TIE)


@given(seed=st.integers(0, 2**16), step=st.integers(0, STEPS - 1), log_gap=st.floats(-9.0, -1.0),
       a_wrong=st.booleans())
def test_a_token_flip_is_judged_on_the_truths_margin(seed, step, log_gap, a_wrong):
    a, b, truth, right, other = token_case(seed, step, 10.0 ** log_gap, a_wrong)
    verdict = judge(a, b, truth)
    [flip] = verdict.flips
    values = truth["greedy_logits_p0"][step]
    noise = oracle_token_noise(values, int(a["greedy_p0"][step]), int(b["greedy_p0"][step]))
    assert (flip.key, flip.position, flip.noise) == ("greedy_p0", step, noise)
    assert flip.wrong == ("" if noise else "actual" if a_wrong else "reference")
    assert flip.margin == pytest.approx(values[right] - values[other], rel=1e-9)
    assert verdict.passed == noise


@pytest.mark.parametrize("a_wrong", [True, False])
def test_a_decisive_token_flip_names_the_side_that_disagrees_with_the_truth(a_wrong):
    a, b, truth, _, _ = token_case(5, 1, 0.5, a_wrong)
    [flip] = judge(a, b, truth).flips
    side = "A (the run under test)" if a_wrong else "B (the reference)"
    assert flip.words().startswith(f"bug: {side} disagrees with the truth")


def test_a_flip_within_noise_is_noise_and_passes():
    a, b, truth, _, _ = token_case(5, 2, 0.2 * TOKEN_NEAR_TIE.atol, True)
    verdict = judge(a, b, truth)
    assert verdict.passed and verdict.flips[0].words().startswith("within noise")


def test_after_the_tokens_part_later_logits_are_not_judged():
    """Rows after the parting step follow other contexts: garbage there is not A's failure."""
    a, b, truth, _, _ = token_case(7, 1, 0.2 * TOKEN_NEAR_TIE.atol, True)
    a["greedy_logits_p0"][2:] = 1e6
    verdict = judge(a, b, truth)
    assert verdict.passed
    assert [v.rows for v in verdict.floats if v.key == "greedy_logits_p0"] == [2]


# ------------------------------------------------------------------------------ expert flips


def routing_case(seed: int, row: int, gap: float, a_wrong: bool):
    """T's row `row`: the k-th expert beats the (k+1)-th by `gap`; the wrong side takes the latter."""
    truth = truth_dump(seed)
    values = truth["topk_margin_p0_layer1"][row]
    order = list(np.argsort(-values))
    kth, nxt = order[TOP_K - 1], order[TOP_K]
    values[nxt] = values[kth] - gap
    good, bad = perturbed(truth, 0.0, seed + 1), perturbed(truth, 0.0, seed + 2)
    bad["topk_ids_p0_layer1"][row] = np.sort(order[: TOP_K - 1] + [nxt])
    return (bad, good, truth) if a_wrong else (good, bad, truth)


@given(seed=st.integers(0, 2**16), row=st.integers(0, TOKENS - 1), log_gap=st.floats(-9.0, 0.0),
       a_wrong=st.booleans())
def test_an_expert_flip_is_judged_on_the_truths_deciding_values(seed, row, log_gap, a_wrong):
    a, b, truth = routing_case(seed, row, 10.0 ** log_gap, a_wrong)
    verdict = judge(a, b, truth)
    [flip] = verdict.flips
    values = truth["topk_margin_p0_layer1"][row]
    a_ok = admissible(values, a["topk_ids_p0_layer1"][row].tolist(), TOP_K, NEAR_TIE)
    b_ok = admissible(values, b["topk_ids_p0_layer1"][row].tolist(), TOP_K, NEAR_TIE)
    want = {(True, True): "", (False, True): "actual", (True, False): "reference"}[(a_ok, b_ok)]
    assert (flip.key, flip.position, flip.wrong) == ("topk_ids_p0_layer1", row, want)
    assert verdict.passed == (want == "")
    assert flip.margin == pytest.approx(10.0 ** log_gap, rel=1e-6, abs=1e-12)


def test_without_deciding_values_an_expert_flip_is_never_noise():
    a, b, truth = routing_case(3, 2, 1e-12, True)
    del truth["topk_margin_p0_layer1"]
    [flip] = judge(a, b, truth).flips
    assert flip.wrong == "actual" and "no deciding values" in flip.reason


def test_a_grouped_flip_is_measured_on_group_scores():
    """noaux_tc (2 groups of 4, 1 kept): A's experts from the losing group are wrong by the gap
    between the two groups' top-2 sums, not by the gap between the two experts."""
    truth = truth_dump(0)
    values = np.array([[3.0, 2.0, -5, -5, 2.9, 1.5, -5, -5]] * TOKENS)
    truth |= {"topk_margin_p0_layer1": values, "topk_margin_grouping": np.array([2, 1]),
              "topk_ids_p0_layer1": np.array([[0, 1]] * TOKENS)}
    a, b = perturbed(truth, 0.0, 1), perturbed(truth, 0.0, 2)
    a["topk_ids_p0_layer1"][4] = [4, 5]
    [flip] = judge(a, b, truth).flips
    assert (flip.wrong, flip.margin_of) == ("actual", "group scores")
    assert flip.margin == pytest.approx((3.0 + 2.0) - (2.9 + 1.5))


# ------------------------------------------------------------------------------ a truth that cannot judge


@pytest.mark.parametrize("spoil, words", [
    (lambda t: t.pop("logits_p0"), "lacks"),
    (lambda t: t.update(logits_p0=t["logits_p0"].astype(np.float32)), "not float64"),
    (lambda t: t.update(input_ids_p0=t["input_ids_p0"] + 1), "same prompts"),
])
def test_a_truth_of_other_keys_dtype_or_prompts_is_refused_by_name(spoil, words):
    truth = truth_dump(4)
    a, b = perturbed(truth, 1e-6, 1), perturbed(truth, 1e-6, 2)
    spoil(truth)
    with pytest.raises(TruthError, match=words):
        judge(a, b, truth)


def test_runs_of_different_keys_are_refused_by_name():
    truth = truth_dump(4)
    a, b = perturbed(truth, 1e-6, 1), perturbed(truth, 1e-6, 2)
    del a["topk_ids_p0_layer1"]
    with pytest.raises(TruthError, match="topk_ids_p0_layer1"):
        judge(a, b, truth)
