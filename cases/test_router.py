"""MoE routing (engine/moe/router.py) against the independent float64 reference.

The property checks are plain functions returning a list of problems, so the hypothesis properties
and the planted-fault cases (each failpoint must make a check fail) call the same code.

Near-ties: a token whose reference decision margin (k-th vs (k+1)-th selection score, or
topk_group-th vs next group score) is below `TIE_MARGIN` may legitimately route differently in
float32, or by a different tie-break rule (paddle.topk prefers the higher index, the reference the
lower one). Such tokens are counted and reported (hypothesis `event` / `note`), not compared by id;
every other token must match the reference exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import paddle
import pytest
import router_reference as ref_router
from hypothesis import event, given, note
from hypothesis import strategies as st
from paddle.static import InputSpec

from engine.failpoints import KNOWN, NO_FAULTS, Failpoints
from engine.moe import router
from verifier.tolerance import tolerance_for

# Selection scores are sigmoid (< 1) plus a bias (|bias| <= 3 here) or softmax probabilities, so a
# float32 score carries an absolute error of a few 1e-7; a top-2 group sum twice that. A reference
# margin below 1e-5 may therefore flip in float32: those tokens are near-ties.
TIE_MARGIN = 1e-5
# Weights: float32 sigmoid/softmax (a few ulp), a k-term sum and one division, times a scaling
# factor <= 2.5. Measured worst case over 1,500 random cases: 6.3e-7 relative, 3.3e-7 absolute,
# so this bound leaves about 15x headroom while a real formula bug (>1e-2) stays far outside it.
# The float32 row's atol (1e-5, sized for logits that cancel to near 0) would hide such bugs in
# small weights, hence an override of the pair.
WEIGHTS = tolerance_for("float32", rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One routing problem. `logits` include the padding rows when `num_real` is set."""

    kind: str  # "softmax_topk" | "noaux_tc"
    logits: np.ndarray  # [T, E] float32
    top_k: int
    norm_topk_prob: bool
    bias: np.ndarray | None = None  # [E] float32 (noaux_tc)
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    num_real: int | None = None

    @property
    def real(self) -> int:
        return self.logits.shape[0] if self.num_real is None else self.num_real


def route(case: Case, faults: Failpoints = NO_FAULTS, num_real="case"):
    """Engine routing as NumPy (ids [T, k], weights [T, k])."""
    num_real = case.num_real if num_real == "case" else num_real
    logits = paddle.to_tensor(case.logits)
    if case.kind == "softmax_topk":
        out = router.softmax_topk(logits, top_k=case.top_k, norm_topk_prob=case.norm_topk_prob,
                                  num_real=num_real, faults=faults)
    else:
        bias = None if case.bias is None else paddle.to_tensor(case.bias)
        out = router.noaux_tc(logits, bias, top_k=case.top_k, n_group=case.n_group,
                              topk_group=case.topk_group, norm_topk_prob=case.norm_topk_prob,
                              routed_scaling_factor=case.routed_scaling_factor, num_real=num_real,
                              faults=faults)
    return out[0].numpy(), out[1].numpy()


def reference(case: Case) -> ref_router.Routing:
    """The float64 reference on the real rows only."""
    logits = case.logits[: case.real]
    if case.kind == "softmax_topk":
        return ref_router.softmax_topk(logits, top_k=case.top_k, norm_topk_prob=case.norm_topk_prob)
    return ref_router.noaux_tc(logits, case.bias, top_k=case.top_k, n_group=case.n_group,
                               topk_group=case.topk_group, norm_topk_prob=case.norm_topk_prob,
                               routed_scaling_factor=case.routed_scaling_factor)


# ---------------------------------------------------------------------------- property checks


def near_ties(ref: ref_router.Routing) -> np.ndarray:
    """[T] bool: tokens whose routing decision is within TIE_MARGIN of flipping."""
    return ref.margin < TIE_MARGIN


def check_ids(case: Case, ids, weights, ref) -> list[str]:
    """Real rows hold k distinct in-range ids; outside near-ties, the reference's id set."""
    ids = ids[: case.real]
    problems = []
    num_experts = case.logits.shape[1]
    for row in np.flatnonzero(((ids < 0) | (ids >= num_experts)).any(axis=-1)):
        problems.append(f"token {row}: id out of range [0, {num_experts}): {ids[row].tolist()}")
    for row in np.flatnonzero(np.diff(np.sort(ids, axis=-1), axis=-1).min(axis=-1, initial=1) == 0):
        problems.append(f"token {row}: repeated expert id {ids[row].tolist()}")
    differs = (np.sort(ids, axis=-1) != np.sort(ref.ids, axis=-1)).any(axis=-1) & ~near_ties(ref)
    for row in np.flatnonzero(differs):
        problems.append(f"token {row}: ids {sorted(ids[row].tolist())} != reference "
                        f"{sorted(ref.ids[row].tolist())} (margin {ref.margin[row]:.3g})")
    return problems


def check_weights(case: Case, ids, weights, ref) -> list[str]:
    """Where the id sets agree with the reference, weights agree within the float32 tolerance."""
    ids, weights = ids[: case.real], weights[: case.real]
    same = (np.sort(ids, axis=-1) == np.sort(ref.ids, axis=-1)).all(axis=-1)
    got = np.take_along_axis(weights, np.argsort(ids, axis=-1), axis=-1)[same]
    want = np.take_along_axis(ref.weights, np.argsort(ref.ids, axis=-1), axis=-1)[same]
    return _close("weights vs reference", got, want, np.flatnonzero(same))


def check_weight_formula(case: Case, ids, weights, ref=None) -> list[str]:
    """Weights are the unbiased scores of the experts the engine chose, renormalised when
    norm_topk_prob, times the scaling factor: the bias selects, it never weighs. Independent of
    ties, because it is computed from the engine's own ids."""
    ids, weights = ids[: case.real], weights[: case.real]
    score = ref_router.softmax if case.kind == "softmax_topk" else ref_router.sigmoid
    scores = score(case.logits[: case.real])  # [T, E] float64, unbiased
    want = np.take_along_axis(scores, np.clip(ids, 0, scores.shape[1] - 1), axis=-1)
    if case.norm_topk_prob:
        want = want / (want.sum(axis=-1, keepdims=True) + ref_router.RENORM_EPS)
    return _close("weight formula", weights, want * case.routed_scaling_factor, np.arange(len(ids)))


def check_kept_groups(case: Case, ids, weights, ref) -> list[str]:
    """Every chosen expert lies in one of the reference's kept groups (unless the group choice
    itself is a near-tie)."""
    group_size = case.logits.shape[1] // case.n_group
    groups = np.clip(ids[: case.real], 0, None) // group_size  # [T, k]
    inside = np.take_along_axis(ref.kept_groups, groups, axis=-1).all(axis=-1)
    bad = ~inside & (ref.group_margin >= TIE_MARGIN)
    return [f"token {row}: experts {ids[row].tolist()} outside kept groups "
            f"{np.flatnonzero(ref.kept_groups[row]).tolist()}" for row in np.flatnonzero(bad)]


def check_padding(case: Case, ids, weights, ref=None) -> list[str]:
    """Rows >= num_real are exactly id -1 and weight 0."""
    pad_ids, pad_weights = ids[case.real:], weights[case.real:]
    bad = (pad_ids != -1).any(axis=-1) | (pad_weights != 0).any(axis=-1)
    return [f"padding row {case.real + row}: ids {pad_ids[row].tolist()} weights "
            f"{pad_weights[row].tolist()}" for row in np.flatnonzero(bad)]


CHECKS = (check_ids, check_weights, check_weight_formula, check_kept_groups, check_padding)


def routing_problems(case: Case, faults: Failpoints = NO_FAULTS, checks=CHECKS) -> list[str]:
    """The given property checks on one routed case; empty means correct."""
    ids, weights = route(case, faults)
    ref = reference(case)
    return [problem for check in checks for problem in check(case, ids, weights, ref)]


def _close(what, got, want, rows) -> list[str]:
    """One problem naming the worst element if |got - want| > atol + rtol * |want| anywhere."""
    excess = np.abs(got - want) - (WEIGHTS.atol + WEIGHTS.rtol * np.abs(want))
    excess = np.where(np.isnan(excess), np.inf, excess)  # NaN never passes
    if not (excess > 0).any():
        return []
    r, c = np.unravel_index(np.argmax(excess), excess.shape)
    return [(f"{what}: {(excess > 0).sum()} mismatches, worst at token {rows[r]} slot {c}: "
             f"{float(got[r, c])!r} vs {float(want[r, c])!r}")]


# ---------------------------------------------------------------------------- strategies


@st.composite
def logit_arrays(draw, tokens: int, experts: int) -> np.ndarray:
    """[tokens, experts] float32 logits, often with exact ties (a coarse grid, duplicated columns)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    logits = rng.normal(0.0, draw(st.sampled_from([0.5, 2.0, 4.0])), (tokens, experts))
    grid = draw(st.sampled_from([None, None, 0.5, 0.125]))
    if grid:
        logits = np.round(logits / grid) * grid
    if draw(st.booleans()):
        copies = rng.integers(0, experts, size=experts // 4)
        logits[:, rng.integers(0, experts, size=copies.size)] = logits[:, copies]
    return np.clip(logits, -8.0, 8.0).astype(np.float32)


@st.composite
def biases(draw, experts: int):
    """None, zeros, or a random bias; the negative kind pushes selection scores below zero."""
    kind = draw(st.sampled_from(["none", "zeros", "small", "large", "negative"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = {"none": 0.0, "zeros": 0.0, "small": 0.01, "large": 1.0, "negative": 0.5}[kind]
    bias = rng.normal(0.0, 1.0, experts) * scale - (2.0 if kind == "negative" else 0.0)
    return None if kind == "none" else bias.astype(np.float32)


@st.composite
def noaux_cases(draw, max_tokens: int = 64) -> Case:
    n_group = draw(st.integers(1, 8))
    group_size = draw(st.integers(2, 64 // n_group))
    topk_group = draw(st.integers(1, n_group))
    top_k = draw(st.integers(1, min(8, topk_group * group_size)))
    case = Case("noaux_tc", draw(_logits(max_tokens, n_group * group_size)), top_k,
                draw(st.booleans()), draw(biases(n_group * group_size)), n_group, topk_group,
                draw(st.sampled_from([1.0, 2.5, 0.7])))
    return draw(_maybe_padded(case))


@st.composite
def softmax_cases(draw, max_tokens: int = 64) -> Case:
    experts = draw(st.integers(1, 64))
    case = Case("softmax_topk", draw(_logits(max_tokens, experts)), draw(st.integers(1, min(8, experts))),
                draw(st.booleans()))
    return draw(_maybe_padded(case))


def routing_cases(max_tokens: int = 64):
    return st.one_of(noaux_cases(max_tokens), softmax_cases(max_tokens))


@st.composite
def _logits(draw, max_tokens: int, experts: int) -> np.ndarray:
    return draw(logit_arrays(draw(st.integers(1, max_tokens)), experts))


@st.composite
def _maybe_padded(draw, case: Case) -> Case:
    """No num_real at all, or num_real with 0, 1 or 5 padding rows appended."""
    rows = draw(st.sampled_from([None, 0, 1, 5]))
    return case if rows is None else pad(case, rows, draw(st.sampled_from(PADDING_VALUES)))


# Padding rows hold garbage, as a reused static buffer would: it must never reach the real rows.
PADDING_VALUES = (1e30, -np.inf, 7.0)


def pad(case: Case, rows: int, value: float) -> Case:
    """`case` with `rows` padding rows of NaN and `value` appended, and num_real set."""
    garbage = np.full((rows, case.logits.shape[1]), np.nan, dtype=np.float32)
    garbage[:, ::2] = value
    return replace(case, logits=np.concatenate([case.logits, garbage]), num_real=case.logits.shape[0])


def unpadded(case: Case) -> Case:
    """The real rows of `case` alone, without num_real."""
    return replace(case, logits=case.logits[: case.real], num_real=None)


# ---------------------------------------------------------------------------- properties


@given(routing_cases())
def test_routing_matches_reference(case):
    ties = int(near_ties(reference(case)).sum())
    event(f"near-tie tokens: {'none' if not ties else 'some' if ties < case.real else 'all'}")
    note(f"{ties} of {case.real} tokens within TIE_MARGIN={TIE_MARGIN}: ids not compared")
    assert routing_problems(case) == []


@given(noaux_cases())
def test_bias_none_equals_zero_bias_bitwise(case):
    none_ids, none_w = route(replace(case, bias=None))
    zero_ids, zero_w = route(replace(case, bias=np.zeros(case.logits.shape[1], np.float32)))
    np.testing.assert_array_equal(none_ids, zero_ids)
    assert none_w.tobytes() == zero_w.tobytes()


@given(noaux_cases(), st.integers(0, 63))
def test_bias_selects_but_never_weighs(case, favourite):
    """A dominant bias on one expert puts it in every token's choice; weights keep the unbiased
    formula."""
    favourite %= case.logits.shape[1]
    bias = np.zeros(case.logits.shape[1], np.float32)
    bias[favourite] = 10.0
    case = replace(case, bias=bias)
    ids, weights = route(case)
    assert (ids[: case.real] == favourite).any(axis=-1).all()
    assert check_weight_formula(case, ids, weights) == []


@given(routing_cases(max_tokens=32), st.integers(1, 9), st.sampled_from(PADDING_VALUES))
def test_padding_never_changes_real_rows(case, rows, value):
    padded = pad(unpadded(case), rows, value)
    alone_ids, alone_w = route(unpadded(case))
    ids, weights = route(padded)
    real = padded.num_real
    assert ids[:real].tobytes() == alone_ids.tobytes() and weights[:real].tobytes() == alone_w.tobytes()
    for as_tensor in (paddle.to_tensor([real], dtype="int64"), paddle.to_tensor(real, dtype="int32")):
        tensor_ids, tensor_w = route(padded, num_real=as_tensor)  # the graph form: [1] or 0-d
        assert ids.tobytes() == tensor_ids.tobytes() and weights.tobytes() == tensor_w.tobytes()
    assert check_padding(padded, ids, weights) == []


def test_row_position_never_changes_routing():
    """Routing a prefix of the rows gives bitwise the rows of routing them all. With 9 experts the
    buffer ends at every offset modulo a SIMD width, which catches an elementwise kernel whose
    vector body and scalar tail round differently (Paddle's CPU float32 sigmoid does)."""
    rng = np.random.default_rng(7)
    logits = rng.normal(0.0, 2.0, (40, 9)).astype(np.float32)
    cases = [Case("noaux_tc", logits, top_k=2, norm_topk_prob=True, n_group=3, topk_group=2,
                  routed_scaling_factor=2.5),
             Case("softmax_topk", logits, top_k=2, norm_topk_prob=True)]
    for case in cases:
        all_ids, all_w = route(case)
        for rows in range(1, len(logits)):
            ids, weights = route(replace(case, logits=logits[:rows]))
            assert ids.tobytes() == all_ids[:rows].tobytes(), (case.kind, rows)
            assert weights.tobytes() == all_w[:rows].tobytes(), (case.kind, rows)


# ---------------------------------------------------------------------------- non-finite logits


@given(routing_cases(max_tokens=16), st.data())
def test_nonfinite_rows_are_flagged_and_isolated(case, data):
    """A NaN/inf row is flagged and reported by check_finite, keeps in-range ids, and leaves the
    other rows bitwise unchanged."""
    case = unpadded(case)
    tokens = case.logits.shape[0]
    bad_rows = data.draw(st.sets(st.integers(0, tokens - 1), min_size=1, max_size=tokens), label="bad rows")
    logits = case.logits.copy()
    for row in bad_rows:
        logits[row, data.draw(st.integers(0, logits.shape[1] - 1))] = data.draw(
            st.sampled_from([np.nan, np.inf, -np.inf]))
    flags = router.nonfinite_rows(paddle.to_tensor(logits)).numpy()
    assert flags.tolist() == [row in bad_rows for row in range(tokens)]
    with pytest.raises(router.RouterError, match=rf"^layer 3: .* token row {min(bad_rows)} "):
        router.check_finite(flags, layer=3)
    ids, weights = route(replace(case, logits=logits))
    clean_ids, clean_w = route(case)
    assert ((ids >= 0) & (ids < logits.shape[1])).all()
    assert ids[~flags].tobytes() == clean_ids[~flags].tobytes()
    assert weights[~flags].tobytes() == clean_w[~flags].tobytes()


def test_nonfinite_rows_ignores_padding():
    logits = np.zeros((4, 8), np.float32)
    logits[1, 3], logits[3, 0] = np.nan, np.inf
    flags = router.nonfinite_rows(paddle.to_tensor(logits), num_real=3).numpy()
    assert flags.tolist() == [False, True, False, False]


@pytest.mark.parametrize("as_flags", [True, False], ids=["flags", "logits"])
def test_check_finite_names_layer_and_first_row(as_flags):
    logits = np.zeros((6, 8), np.float32)
    logits[4, 1], logits[2, 5] = -np.inf, np.nan
    source = router.nonfinite_rows(paddle.to_tensor(logits)) if as_flags else paddle.to_tensor(logits)
    with pytest.raises(router.RouterError, match=r"layer 7: .* token row 2 \(2 of 6 rows bad\)"):
        router.check_finite(source, layer=7)
    assert issubclass(router.RouterError, ValueError)


def test_check_finite_passes_clean_logits_and_padding_flags():
    router.check_finite(np.zeros((3, 4), np.float32), layer=0)
    logits = np.full((4, 8), np.nan, np.float32)
    logits[:2] = 0.0
    router.check_finite(router.nonfinite_rows(paddle.to_tensor(logits), num_real=2), layer=0)


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "args, field",
    [
        ((16, 2, 3, 1), "n_group"),  # 3 does not divide 16
        ((8, 1, 8, 2), "n_group"),  # one expert per group: no top-2 group score
        ((16, 2, 4, 5), "topk_group"),  # more groups kept than exist
        ((16, 9, 4, 2), "top_k"),  # 2 groups of 4 hold only 8 experts
        ((16, 2, 4, 2, 15), "bias"),  # bias length != experts
        ((0, 1, 1, 1), "num_experts"),
        ((16, 0, 4, 2), "top_k"),
        ((16, 2, -4, 2), "n_group"),
        ((16, 2, 4, 0), "topk_group"),
        ((16, 2.0, 4, 2), "top_k"),  # a float is not a count
    ],
    ids=["indivisible", "singleton-groups", "topk-group", "top-k", "bias-len", "experts-0", "top-k-0",
         "n-group-neg", "topk-group-0", "top-k-float"],
)
def test_validate_grouping_names_the_field(args, field):
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        router.validate_grouping(*args)


def test_noaux_tc_rejects_wrong_bias_length():
    with pytest.raises(ValueError, match=r"^bias .*length 15"):
        router.noaux_tc(paddle.zeros([2, 16]), paddle.zeros([15]), top_k=2, n_group=4, topk_group=2,
                        norm_topk_prob=True, routed_scaling_factor=1.0)


def test_softmax_topk_rejects_top_k_above_experts():
    with pytest.raises(ValueError, match=r"^top_k=9 exceeds num_experts=8"):
        router.softmax_topk(paddle.zeros([2, 8]), top_k=9, norm_topk_prob=True)


def test_num_real_out_of_range_is_rejected():
    with pytest.raises(ValueError, match=r"^num_real=5"):
        router.softmax_topk(paddle.zeros([4, 8]), top_k=2, norm_topk_prob=True, num_real=5)


def test_logits_must_be_2d():
    with pytest.raises(ValueError, match=r"^logits"):
        router.softmax_topk(paddle.zeros([8]), top_k=2, norm_topk_prob=True)


# ---------------------------------------------------------------------------- near-ties


def test_exact_ties_are_near_ties_not_failures():
    """All-equal logits: every choice is a tie, so ids go uncompared but weights still must hold."""
    case = Case("noaux_tc", np.zeros((3, 8), np.float32), top_k=2, norm_topk_prob=True, n_group=2,
                topk_group=1, routed_scaling_factor=2.5)
    assert near_ties(reference(case)).all()
    assert routing_problems(case) == []


# ---------------------------------------------------------------------------- planted faults


_FAULT_LOGITS = np.array([[4.0, -4.0, -4.0, -4.0, 1.5, 1.4, 1.3, 1.2],
                          [0.3, -1.0, 2.0, 0.1, -0.5, 0.8, 0.0, -2.0]], np.float32)
_FAULT_BASE = Case("noaux_tc", _FAULT_LOGITS, top_k=2, norm_topk_prob=True, n_group=2, topk_group=1,
                   routed_scaling_factor=2.5)

# failpoint -> (a fixed input on which the bug changes the routing, the property check that must
# notice it). Every router failpoint in engine/failpoints.py needs an entry (test below).
PLANTED = {
    # The bias selects but must never weigh: a non-constant bias makes biased weights differ.
    "router.bias_in_weights": (replace(_FAULT_BASE, bias=np.linspace(-0.3, 0.4, 8, dtype=np.float32)),
                               check_weight_formula),
    # Token 0: group 0 has the top max (sigmoid(4) = .98) but the lower top-2 sum (.98 + .02 vs
    # .82 + .80), so a max-scored group choice keeps the wrong group.
    "router.group_score_max": (_FAULT_BASE, check_kept_groups),
    # Every biased score is negative, so masked experts filled with 0 outrank the kept ones.
    "router.mask_fill_zero": (replace(_FAULT_BASE, n_group=4, bias=np.full(8, -2.0, np.float32)),
                              check_kept_groups),
    # The top-2 unbiased scores do not sum to 1, so skipping the division changes every weight.
    "router.skip_renorm": (_FAULT_BASE, check_weights),
}


def test_every_router_failpoint_has_a_planted_case():
    assert sorted(PLANTED) == sorted(n for n in KNOWN if n.startswith("router."))


@pytest.mark.parametrize("name", sorted(PLANTED))
def test_planted_fault_is_detected(name):
    case, check = PLANTED[name]
    assert routing_problems(case) == [], "the fixed input must route correctly without the fault"
    problems = routing_problems(case, Failpoints(frozenset({name})), checks=(check,))
    print(f"{name}: {check.__name__} found {len(problems)} problem(s), first: {problems[:1]}")
    assert problems, f"{name}: {check.__name__} did not notice the planted fault"


def test_skip_renorm_is_detected_in_softmax_topk():
    case = Case("softmax_topk", np.array([[1.0, 0.5, -1.0, 2.0]], np.float32), top_k=2, norm_topk_prob=True)
    assert routing_problems(case) == []
    assert routing_problems(case, Failpoints(frozenset({"router.skip_renorm"})), checks=(check_weights,))


# ---------------------------------------------------------------------------- graph mode


GRAPH_TOKENS, GRAPH_EXPERTS = 16, 16


def _graph_inputs():
    rng = np.random.default_rng(4)
    logits = np.round(rng.normal(0, 2, (GRAPH_TOKENS, GRAPH_EXPERTS)) * 4) / 4  # with exact ties
    return paddle.to_tensor(logits.astype(np.float32)), paddle.to_tensor(rng.normal(0, 0.3, GRAPH_EXPERTS).astype(np.float32))


def _noaux(logits, bias, num_real):
    return router.noaux_tc(logits, bias, top_k=4, n_group=4, topk_group=2, norm_topk_prob=True,
                           routed_scaling_factor=2.5, num_real=num_real)


def _softmax(logits, bias, num_real):
    return router.softmax_topk(logits, top_k=4, norm_topk_prob=True, num_real=num_real)


@pytest.mark.parametrize("route_fn", [_noaux, _softmax], ids=["noaux_tc", "softmax_topk"])
def test_static_graph_matches_eager_without_retrace(route_fn):
    traces = []

    def step(logits, bias, num_real):
        traces.append(1)  # a Python side effect: runs at trace time only
        ids, weights = route_fn(logits, bias, num_real)
        return ids, weights, router.nonfinite_rows(logits, num_real)

    static = paddle.jit.to_static(step, full_graph=True, input_spec=[
        InputSpec([GRAPH_TOKENS, GRAPH_EXPERTS], "float32"), InputSpec([GRAPH_EXPERTS], "float32"),
        InputSpec([1], "int64")])
    logits, bias = _graph_inputs()
    for num_real in (11, 5, 11):
        got = static(logits, bias, paddle.to_tensor([num_real], dtype="int64"))
        want = route_fn(logits, bias, num_real)
        assert got[0].numpy().tobytes() == want[0].numpy().tobytes(), f"ids, num_real={num_real}"
        assert got[1].numpy().tobytes() == want[1].numpy().tobytes(), f"weights, num_real={num_real}"
        assert not got[2].numpy().any()
        assert (got[0].numpy()[num_real:] == -1).all()
    assert len(traces) == 1, f"traced {len(traces)} times for one fixed shape"
