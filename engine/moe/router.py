"""MoE routers: which experts each token goes to, and with what weight.

Two router kinds, both plain functions of the router logits (`hidden @ gate.T`, computed by the
caller) so that a model, a test and a graph backend call the same code:

- `softmax_topk` (Qwen3-MoE): softmax over all experts, top-k, optional renormalisation.
- `noaux_tc` (DeepSeek-V3 / GLM-4.5): sigmoid scores; experts are *selected* on scores + the
  correction bias, inside the `topk_group` best groups; the *weights* come from the unbiased scores.

Graph contract: every function here except `check_finite` runs unchanged inside
`paddle.jit.to_static(full_graph=True)` with fixed input shapes. They read only static shape facts
on the host, never tensor data, and produce no data-dependent shapes.

Outputs: `ids` int64 [T, k] and `weights` float32 [T, k]. The order of the k entries in a row is
unspecified. With `num_real` given (an int, or a 0-d / 1-element integer tensor inside a graph), rows
>= num_real are padding: id -1 and weight 0, and their logits (whatever they hold, NaN included)
never affect the real rows.

Non-finite logits: the routers do not check, so they stay pure and graph-safe. For a real row whose
logits are not all finite the ids are still valid expert indices in [0, E) (so in-graph dispatch
stays in bounds) but which experts and what weights (possibly NaN) are unspecified; other rows are
unaffected. The caller computes `nonfinite_rows(logits, num_real)` in the graph and, after the step,
calls `check_finite(flags, layer)` on the host, which raises `RouterError` naming the layer and the
first bad token row. A step with non-finite router logits is therefore an error, never silent.

Paddle 3.3.1 CPU kernels the routers use, probed for clips that would tie distinct candidates:
- softmax (float32 and float64) and log_softmax clip `x - max` at -64: hence selection on logits.
- float32 exp: the vectorised body clamps its input near -88.4 (exp(-100) = exp(-800) = 2.9e-39)
  while the scalar tail does not; float32 sigmoid flushes below ~-88 to 0. Neither is used.
- float64 sigmoid (noaux_tc): no clip (sigmoid(-300) = 5e-131); rounded to float32 it keeps
  denormals, so scores are exactly 0 only below ~-103.9 and exactly 1 from ~16.6 up. Those ties are
  float32's own (any float32 router has them; the float64 reference differs there by less than the
  near-tie rule's bound), not a kernel's.
- float32 <-> float64 casts are exact both ways for float32 values; topk ranks NaN first, then
  +inf, and breaks exact ties by an index order that varies with the row length.

`faults=None` means no failpoints. The default is a literal on purpose: Paddle's AST to_static
re-executes each converted `def` in a fresh module before this module's globals are attached, so a
default such as `NO_FAULTS` raises NameError at conversion time.
"""

from __future__ import annotations

import numpy as np
import paddle

from engine.config import check_grouping
from engine.errors import UserError
from engine.failpoints import NO_FAULTS, Failpoints
from engine.layers.indices import arange
from engine.layers.scalars import operand

# Added to the renormalisation denominator, as in the DeepSeek-V3 / GLM-4.5 reference, so that a
# row whose chosen unbiased scores all underflow to 0 yields 0 weights instead of NaN.
RENORM_EPS = 1e-20


class RouterError(UserError, ValueError):
    """Router logits of a real token row were NaN or infinite."""


# ---------------------------------------------------------------------------- validation


def validate_grouping(num_experts, top_k, n_group, topk_group, bias_len=None) -> None:
    """Raise ConfigError (a ValueError) naming the offending field if this noaux_tc grouping cannot
    route. The grouping rules are the config validator's (`engine.config.check_grouping`), so a
    config that loads is one the router accepts; the bias length is the router's own check."""
    check_grouping(num_experts, top_k, n_group, topk_group)
    if bias_len is not None and bias_len != num_experts:
        raise ValueError(f"bias (e_score_correction_bias) has length {bias_len}, "
                         f"expected num_experts={num_experts}")


def _validate_top_k(num_experts, top_k) -> None:
    _require_positive(num_experts=num_experts, top_k=top_k)
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} exceeds num_experts={num_experts}")


def _require_positive(**fields) -> None:
    for name, value in fields.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _logit_shape(logits) -> tuple[int, int]:
    """[T, E] from the static shape; a graph with a dynamic dimension is a caller bug."""
    if len(logits.shape) != 2 or min(logits.shape) < 0:
        raise ValueError(f"logits must have a fixed shape [tokens, experts], got {list(logits.shape)}")
    return int(logits.shape[0]), int(logits.shape[1])


def _bias_len(bias):
    if bias is None:
        return None
    if len(bias.shape) != 1:
        raise ValueError(f"bias (e_score_correction_bias) must be 1-D [experts], got {list(bias.shape)}")
    return int(bias.shape[0])


# ---------------------------------------------------------------------------- routers


def softmax_topk(logits, *, top_k, norm_topk_prob, num_real=None, faults: Failpoints | None = None):
    """Qwen3-MoE routing: the top_k experts by logit, weighted by their softmax probability over all
    E experts in float32 (float64 for float64 logits), divided by the top_k sum when `norm_topk_prob`.
    Returns (ids int64 [T, k], weights float32 or float64 [T, k]).

    Selection reads the logits, not the probabilities: softmax is monotonic, so the choice is the
    same in exact arithmetic, but Paddle's CPU softmax clips `x - max` at -64 before `exp`, so every
    expert more than 64 nats below a row's best gets one shared probability and a top-k over
    probabilities picks among them by index. The weights still come from that softmax (bitwise
    what they always were); a clipped weight is below exp(-64) ~ 1.6e-28, absolutely negligible.
    """
    faults = NO_FAULTS if faults is None else faults
    _, num_experts = _logit_shape(logits)
    _validate_top_k(num_experts, top_k)
    logits = logits.astype(_compute_dtype(logits))  # [T, E]
    ids = paddle.topk(logits, k=top_k, axis=-1)[1]  # [T, k]
    probs = paddle.nn.functional.softmax(logits, axis=-1)  # [T, E]
    # broadcast=False: ids and probs have the same T rows already; broadcasting would add two
    # identity expands a router call (the same gather either way)
    weights = paddle.take_along_axis(probs, ids, axis=-1, broadcast=False)  # [T, k]
    if norm_topk_prob and not faults.on("router.skip_renorm"):
        # No epsilon: the top-1 probability is at least 1/E, so the sum is never 0.
        weights = weights / weights.sum(axis=-1, keepdim=True)
    return _mask_padding(ids, weights, num_real)


def noaux_tc(logits, bias, *, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor,
             num_real=None, faults: Failpoints | None = None):
    """DeepSeek-V3 / GLM-4.5 grouped routing ("noaux_tc").

    scores = sigmoid(logits); selection = scores + bias (bias None routes exactly like a zero bias);
    each group is scored by the sum of its top-2 selection scores, the best `topk_group` groups are
    kept and the rest masked to -inf; the top_k selection scores inside pick the experts; their
    weights are the *unbiased* scores, divided by (sum + 1e-20) when `norm_topk_prob`, times
    `routed_scaling_factor`. Returns (ids int64 [T, k], weights float32 [T, k]; float64 for float64 logits).
    """
    faults = NO_FAULTS if faults is None else faults
    _, num_experts = _logit_shape(logits)
    validate_grouping(num_experts, top_k, n_group, topk_group, _bias_len(bias))
    scores = _sigmoid(logits)  # [T, E]
    if bias is None and faults.on("router.bias_absent_crash"):
        selection = scores + bias  # the seed bug: a missing bias reaches arithmetic
    else:
        selection = scores if bias is None else scores + bias.astype(scores.dtype)  # [T, E]
    kept = _kept_experts(selection, n_group, topk_group, faults)  # [T, E] bool
    fill = 0.0 if faults.on("router.mask_fill_zero") else float("-inf")
    masked = paddle.where(kept, selection, paddle.full_like(selection, fill))  # [T, E]
    ids = paddle.topk(masked, k=top_k, axis=-1)[1]  # [T, k]
    source = selection if faults.on("router.bias_in_weights") else scores
    weights = paddle.take_along_axis(source, ids, axis=-1, broadcast=False)  # [T, k]
    if norm_topk_prob and not faults.on("router.skip_renorm"):
        weights = weights / (weights.sum(axis=-1, keepdim=True) + operand(RENORM_EPS, weights))
    return _mask_padding(ids, weights * operand(routed_scaling_factor, weights), num_real)


def _sigmoid(logits):
    """float32 sigmoid of each logit, independent of the logit's position in the buffer.

    Paddle's CPU float32 sigmoid (like exp and silu) rounds the vectorised body and the scalar tail
    of a buffer differently (by 1 ulp), so a token's scores would change with the number of rows
    after it: padding to a capture size would perturb real rows, and an exact tie could break
    differently in graph and eager runs. Evaluated in float64 and rounded once, each score depends
    on its logit alone (barring a ~2**-29 chance per element that the two float64 paths straddle a
    float32 rounding boundary), and is as accurate as a float32 result can be. A float64 engine's
    scores stay float64.
    """
    return paddle.nn.functional.sigmoid(logits.astype("float64")).astype(_compute_dtype(logits))  # [T, E]


def _compute_dtype(logits) -> str:
    """float64 for a float64 engine's logits (routing in float64 end to end), float32 for any other."""
    return "float64" if logits.dtype == paddle.float64 else "float32"


def _kept_experts(selection, n_group, topk_group, faults):
    """[T, E] bool: True for the experts of each token's `topk_group` best groups."""
    num_tokens, num_experts = selection.shape
    grouped = selection.reshape([num_tokens, n_group, num_experts // n_group])  # [T, G, E/G]
    if faults.on("router.group_score_max"):
        group_scores = grouped.max(axis=-1)  # [T, G]
    else:
        group_scores = paddle.topk(grouped, k=2, axis=-1)[0].sum(axis=-1)  # [T, G]
    best = paddle.topk(group_scores, k=topk_group, axis=-1)[1]  # [T, topk_group]
    group_kept = paddle.nn.functional.one_hot(best, n_group).sum(axis=1) > 0  # [T, G]
    per_expert = group_kept.unsqueeze(-1).expand(grouped.shape)  # [T, G, E/G]
    return per_expert.reshape([num_tokens, num_experts])


# ---------------------------------------------------------------------------- padding


def _mask_padding(ids, weights, num_real):
    """Padding rows (>= num_real) become id -1 / weight 0; real rows pass through bitwise."""
    if num_real is None or _no_padding(ids.shape[0], num_real):
        return ids, weights
    # Broadcast here, once: `paddle.where` broadcasting a [T, 1] mask itself builds 17 ops per call.
    real = _real_rows(ids.shape[0], num_real).unsqueeze(-1).expand(ids.shape)  # [T, k]
    ids = paddle.where(real, ids, paddle.full_like(ids, -1))  # [T, k]
    weights = paddle.where(real, weights, paddle.zeros_like(weights))  # [T, k]
    return ids, weights


def _no_padding(num_tokens, num_real) -> bool:
    """Eagerly, whether all `num_tokens` rows are real (num_real read on the host, a [1] tensor or
    an int, range-checked): the padding masks are then identities, and an eager decode step saved
    their ten ops a MoE layer. A traced program cannot read num_real and always masks."""
    if not paddle.in_dynamic_mode():
        return False
    if isinstance(num_real, (int, np.integer)):
        _check_num_real(num_tokens, num_real)
        return num_real == num_tokens
    return num_real.size == 1 and int(num_real.item()) == num_tokens


def _check_num_real(num_tokens, num_real) -> None:
    if isinstance(num_real, bool) or not 0 <= num_real <= num_tokens:
        raise ValueError(f"num_real={num_real!r} must lie in [0, {num_tokens}]")


def _real_rows(num_tokens, num_real):
    """[T] bool, True for rows < num_real. An int is range-checked here; a tensor (the graph case)
    cannot be read on the host, so its range is the caller's contract."""
    if isinstance(num_real, (int, np.integer)):
        _check_num_real(num_tokens, num_real)
    else:
        num_real = num_real.astype("int64").reshape([-1])  # [1]
    return arange(num_tokens) < num_real  # [T]


# ---------------------------------------------------------------------------- non-finite logits


def nonfinite_rows(logits, num_real=None):
    """[T] bool, True for real rows whose router logits hold a NaN or an infinity (graph-safe).
    Padding rows are always False: their contents are undefined by design."""
    bad = paddle.logical_not(paddle.isfinite(logits).all(axis=-1))  # [T]
    if num_real is None or _no_padding(bad.shape[0], num_real):
        return bad
    return paddle.logical_and(bad, _real_rows(bad.shape[0], num_real))


def check_finite(logits_or_flags, layer: int) -> None:
    """Host-side check after a step: raise RouterError naming `layer` and the first bad token row.

    Takes either the flags from `nonfinite_rows` ([T] bool) or the logits themselves ([T, E],
    every row treated as real); a Paddle tensor or a NumPy array.
    """
    values = np.asarray(logits_or_flags.numpy() if hasattr(logits_or_flags, "numpy") else logits_or_flags)
    flags = values if values.dtype == np.bool_ else ~np.isfinite(values).all(axis=-1)  # [T]
    bad = np.flatnonzero(flags.reshape(-1))
    if bad.size:
        raise RouterError(f"layer {layer}: router logits are not finite at token row {bad[0]} "
                          f"({bad.size} of {flags.size} rows bad)")
