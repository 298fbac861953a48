"""MoE routing (engine/moe/router.py) against the independent float64 reference.

Problems, the engine call and the property checks live in `router_checks.py`, the strategies in
`strategies.py`. Every case that routes plants the run's failpoints (`--failpoints`, through the
`faults` fixture), so `pytest cases/test_router.py --failpoints router.NAME` fails for each router
fault. Expert ids are compared exactly except at positions near-tied under
`verifier.tolerance.NEAR_TIE` on the deciding values (logits / biased scores), which are counted
and reported (hypothesis `event` / `note`).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import paddle
import pytest
from hypothesis import event, example, given, note
from hypothesis import strategies as st
from paddle.static import InputSpec
from router_checks import (PADDING_VALUES, Case, check_padding, check_weight_formula, check_weights,
                           check_kept_groups, contested_rows, pad, reference, route, routing_problems,
                           unpadded)
from strategies import noaux_cases, routing_cases, softmax_cases

from engine.failpoints import KNOWN, Failpoints
from engine.moe import router


# ---------------------------------------------------------------------------- properties


def _rows(*rows) -> np.ndarray:
    return np.array(rows, np.float32)


# The reproducer: experts 65, 100 and 300 nats below the best. Paddle's softmax clips all
# three to one probability, so a top-k over probabilities picked expert 2 instead of 1.
WIDE_ROW = _rows([0.0, -65.0, -100.0, -300.0], [-300.0, 5.0, -70.0, -90.0])
WIDE_EIGHT = _rows([1e3, -1e3, 40.0, -200.0, 0.0, -64.5, -64.0, 3e37],
                   [0.0, 0.0, -80.0, -80.0, 1.0, -70.0, 2.0, -500.0])
SATURATED = np.where(WIDE_EIGHT >= 0, 1e30, -1e30).astype(np.float32)
NEG_BIAS = np.full(8, -2.0, np.float32) + np.linspace(-0.3, 0.3, 8, dtype=np.float32)
MIXED_BIAS = np.array([-0.4, 0.3, 0.2, -0.1, -0.3, 0.5, 0.1, -0.2], np.float32)


def _assert_routes_like_reference(case, faults):
    contested = int(contested_rows(reference(case)).sum())
    event(f"near-tied tokens: {'none' if not contested else 'some' if contested < case.real else 'all'}")
    note(f"{contested} of {case.real} tokens have near-tied experts: only those positions go uncompared")
    for corner in _corners(case):
        event(corner)  # --hypothesis-show-statistics shows that the profile reaches each corner
    assert routing_problems(case, faults) == []


def _corners(case) -> list[str]:
    """The strategy corners this case sits in."""
    spread = np.ptp(case.logits[: case.real], axis=-1).max(initial=0.0)
    corners = [f"norm_topk_prob={case.norm_topk_prob}", f"spread {'>' if spread > 64 else '<='} 64 nats"]
    corners += ["top_k=1 renormalised"] if case.top_k == 1 and case.norm_topk_prob else []
    if case.kind == "noaux_tc":
        masked = case.topk_group < case.n_group
        corners += ["groups of 2"] if case.logits.shape[1] == 2 * case.n_group else []
        corners += ["masked group" if masked else "topk_group == n_group"]
        if case.bias is not None and (case.bias < 0).any():
            corners += ["negative bias, masked group" if masked else "negative bias"]
            corners += ["mixed-sign bias"] if (case.bias > 0).any() else []
    return corners


@given(softmax_cases())
@example(Case("softmax_topk", WIDE_ROW, top_k=2, norm_topk_prob=False))
@example(Case("softmax_topk", WIDE_EIGHT, top_k=3, norm_topk_prob=True))
@example(Case("softmax_topk", WIDE_EIGHT, top_k=1, norm_topk_prob=True))
@example(Case("softmax_topk", WIDE_EIGHT, top_k=1, norm_topk_prob=False))
def test_softmax_topk_matches_reference(faults, case):
    _assert_routes_like_reference(case, faults)


_NOAUX = Case("noaux_tc", WIDE_EIGHT / 100, top_k=2, norm_topk_prob=True, n_group=4, topk_group=2,
              routed_scaling_factor=2.5)


@given(noaux_cases())
@example(replace(_NOAUX, top_k=1))  # top_k = 1 with renormalisation: every weight is the scale
@example(replace(_NOAUX, norm_topk_prob=False))
@example(replace(_NOAUX, bias=NEG_BIAS, topk_group=1))  # a masked group, every biased score < 0
@example(replace(_NOAUX, bias=MIXED_BIAS))
@example(replace(_NOAUX, bias=MIXED_BIAS, n_group=2, topk_group=2))  # topk_group == n_group
@example(replace(_NOAUX, logits=WIDE_EIGHT, bias=NEG_BIAS, n_group=4, topk_group=3, top_k=5))
@example(replace(_NOAUX, logits=SATURATED))  # sigmoid saturates: exact 0 / 1 ties, no bias
def test_noaux_tc_matches_reference(faults, case):
    _assert_routes_like_reference(case, faults)


@given(noaux_cases())
def test_bias_none_equals_zero_bias_bitwise(faults, case):
    none_ids, none_w = route(replace(case, bias=None), faults)
    zero_ids, zero_w = route(replace(case, bias=np.zeros(case.logits.shape[1], np.float32)), faults)
    np.testing.assert_array_equal(none_ids, zero_ids)
    assert none_w.tobytes() == zero_w.tobytes()


@given(noaux_cases(), st.integers(0, 63))
def test_bias_selects_but_never_weighs(faults, case, favourite):
    """A dominant bias on one expert puts it in every token's choice; weights keep the unbiased
    formula."""
    favourite %= case.logits.shape[1]
    bias = np.zeros(case.logits.shape[1], np.float32)
    bias[favourite] = 10.0
    case = replace(case, bias=bias)
    ids, weights = route(case, faults)
    assert (ids[: case.real] == favourite).any(axis=-1).all()
    assert check_weight_formula(case, ids, weights) == []


@given(routing_cases(max_tokens=32), st.integers(1, 9), st.sampled_from(PADDING_VALUES))
def test_padding_never_changes_real_rows(faults, case, rows, value):
    padded = pad(unpadded(case), rows, value)
    alone_ids, alone_w = route(unpadded(case), faults)
    ids, weights = route(padded, faults)
    real = padded.num_real
    assert ids[:real].tobytes() == alone_ids.tobytes() and weights[:real].tobytes() == alone_w.tobytes()
    for as_tensor in (paddle.to_tensor([real], dtype="int64"), paddle.to_tensor(real, dtype="int32")):
        tensor_ids, tensor_w = route(padded, faults, num_real=as_tensor)  # the graph form: [1] or 0-d
        assert ids.tobytes() == tensor_ids.tobytes() and weights.tobytes() == tensor_w.tobytes()
    assert check_padding(padded, ids, weights) == []


def test_row_position_never_changes_routing(faults):
    """Routing a prefix of the rows gives bitwise the rows of routing them all. With 9 experts the
    buffer ends at every offset modulo a SIMD width, which catches an elementwise kernel whose
    vector body and scalar tail round differently (Paddle's CPU float32 sigmoid does)."""
    rng = np.random.default_rng(7)
    logits = rng.normal(0.0, 2.0, (40, 9)).astype(np.float32)
    cases = [Case("noaux_tc", logits, top_k=2, norm_topk_prob=True, n_group=3, topk_group=2,
                  routed_scaling_factor=2.5),
             Case("softmax_topk", logits, top_k=2, norm_topk_prob=True)]
    for case in cases:
        all_ids, all_w = route(case, faults)
        for rows in range(1, len(logits)):
            ids, weights = route(replace(case, logits=logits[:rows]), faults)
            assert ids.tobytes() == all_ids[:rows].tobytes(), (case.kind, rows)
            assert weights.tobytes() == all_w[:rows].tobytes(), (case.kind, rows)


# ---------------------------------------------------------------------------- non-finite logits


@given(routing_cases(max_tokens=16), st.data())
def test_nonfinite_rows_are_flagged_and_isolated(faults, case, data):
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
    ids, weights = route(replace(case, logits=logits), faults)
    clean_ids, clean_w = route(case, faults)
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


def test_noaux_tc_rejects_wrong_bias_length(faults):
    with pytest.raises(ValueError, match=r"^bias .*length 15"):
        router.noaux_tc(paddle.zeros([2, 16]), paddle.zeros([15]), top_k=2, n_group=4, topk_group=2,
                        norm_topk_prob=True, routed_scaling_factor=1.0, faults=faults)


def test_softmax_topk_rejects_top_k_above_experts(faults):
    with pytest.raises(ValueError, match=r"^top_k=9 exceeds num_experts=8"):
        router.softmax_topk(paddle.zeros([2, 8]), top_k=9, norm_topk_prob=True, faults=faults)


def test_num_real_out_of_range_is_rejected(faults):
    with pytest.raises(ValueError, match=r"^num_real=5 must lie in \[0, 4\]"):
        router.softmax_topk(paddle.zeros([4, 8]), top_k=2, norm_topk_prob=True, num_real=5, faults=faults)


def test_bias_must_be_1d(faults):
    with pytest.raises(ValueError, match=r"^bias \(e_score_correction_bias\) must be 1-D \[experts\], got \[1, 16\]$"):
        router.noaux_tc(paddle.zeros([2, 16]), paddle.zeros([1, 16]), top_k=2, n_group=4, topk_group=2,
                        norm_topk_prob=True, routed_scaling_factor=1.0, faults=faults)


def test_all_rows_padding_and_default_faults(faults):
    """num_real=0 is a valid step of padding only; omitting `faults` routes like the run's faults
    (none unless --failpoints plants some, when this case fails as it should)."""
    case = Case("noaux_tc", WIDE_EIGHT / 100, top_k=2, norm_topk_prob=True, n_group=4, topk_group=2)
    ids, weights = route(replace(case, num_real=0), faults)
    assert (ids == -1).all() and (weights == 0).all()
    logits = paddle.to_tensor(case.logits)
    for call in (lambda **kw: router.softmax_topk(logits, top_k=2, norm_topk_prob=True, **kw),
                 lambda **kw: router.noaux_tc(logits, None, top_k=2, n_group=4, topk_group=2, norm_topk_prob=True,
                                              routed_scaling_factor=2.5, **kw)):
        default, planted = call(), call(faults=faults)
        assert default[0].numpy().tobytes() == planted[0].numpy().tobytes()
        assert default[1].numpy().tobytes() == planted[1].numpy().tobytes()


def test_logits_must_be_2d(faults):
    with pytest.raises(ValueError, match=r"^logits must have a fixed shape"):
        router.softmax_topk(paddle.zeros([8]), top_k=2, norm_topk_prob=True, faults=faults)


# ---------------------------------------------------------------------------- near-ties


def test_exact_ties_are_near_ties_not_failures(faults):
    """All-equal logits: every choice is a tie, so ids go uncompared but weights still must hold."""
    case = Case("noaux_tc", np.zeros((3, 8), np.float32), top_k=2, norm_topk_prob=True, n_group=2,
                topk_group=1, routed_scaling_factor=2.5)
    assert contested_rows(reference(case)).all()
    assert routing_problems(case, faults) == []


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


# Planted faults that make routing raise instead of route wrongly (the seed's crash).
CRASHES = {"router.bias_absent_crash"}


def test_every_router_failpoint_has_a_planted_case():
    assert sorted(PLANTED.keys() | CRASHES) == sorted(n for n in KNOWN if n.startswith("router."))


def test_planted_crash_on_an_absent_bias_is_detected(faults):
    case = replace(_FAULT_BASE, bias=None)  # a GLM checkpoint without e_score_correction_bias
    assert routing_problems(case, faults) == [], "an absent bias routes like a zero bias"
    with pytest.raises(TypeError):
        routing_problems(case, Failpoints(faults.active | {"router.bias_absent_crash"}))


@pytest.mark.parametrize("name", sorted(PLANTED))
def test_planted_fault_is_detected(faults, name):
    case, check = PLANTED[name]
    assert routing_problems(case, faults) == [], "the fixed input must route correctly without the fault"
    problems = routing_problems(case, Failpoints(faults.active | {name}), checks=(check,))
    print(f"{name}: {check.__name__} found {len(problems)} problem(s), first: {problems[:1]}")
    assert problems, f"{name}: {check.__name__} did not notice the planted fault"


def test_skip_renorm_is_detected_in_softmax_topk(faults):
    case = Case("softmax_topk", np.array([[1.0, 0.5, -1.0, 2.0]], np.float32), top_k=2, norm_topk_prob=True)
    assert routing_problems(case, faults) == []
    assert routing_problems(case, Failpoints(faults.active | {"router.skip_renorm"}), checks=(check_weights,))


# ---------------------------------------------------------------------------- graph mode


GRAPH_TOKENS, GRAPH_EXPERTS = 16, 16


def _graph_inputs():
    rng = np.random.default_rng(4)
    logits = np.round(rng.normal(0, 2, (GRAPH_TOKENS, GRAPH_EXPERTS)) * 4) / 4  # with exact ties
    return paddle.to_tensor(logits.astype(np.float32)), paddle.to_tensor(rng.normal(0, 0.3, GRAPH_EXPERTS).astype(np.float32))


def _noaux(logits, bias, num_real, faults):
    return router.noaux_tc(logits, bias, top_k=4, n_group=4, topk_group=2, norm_topk_prob=True,
                           routed_scaling_factor=2.5, num_real=num_real, faults=faults)


def _softmax(logits, bias, num_real, faults):
    return router.softmax_topk(logits, top_k=4, norm_topk_prob=True, num_real=num_real, faults=faults)


@pytest.mark.parametrize("route_fn", [_noaux, _softmax], ids=["noaux_tc", "softmax_topk"])
def test_static_graph_matches_eager_without_retrace(faults, route_fn):
    traces = []

    def step(logits, bias, num_real):
        traces.append(1)  # a Python side effect: runs at trace time only
        ids, weights = route_fn(logits, bias, num_real, faults)
        return ids, weights, router.nonfinite_rows(logits, num_real)

    static = paddle.jit.to_static(step, full_graph=True, input_spec=[
        InputSpec([GRAPH_TOKENS, GRAPH_EXPERTS], "float32"), InputSpec([GRAPH_EXPERTS], "float32"),
        InputSpec([1], "int64")])
    logits, bias = _graph_inputs()
    for num_real in (11, 5, 11):
        got = static(logits, bias, paddle.to_tensor([num_real], dtype="int64"))
        want = route_fn(logits, bias, num_real, faults)
        assert got[0].numpy().tobytes() == want[0].numpy().tobytes(), f"ids, num_real={num_real}"
        assert got[1].numpy().tobytes() == want[1].numpy().tobytes(), f"weights, num_real={num_real}"
        assert not got[2].numpy().any()
        assert (got[0].numpy()[num_real:] == -1).all()
    assert len(traces) == 1, f"traced {len(traces)} times for one fixed shape"
