"""An independent NumPy float64 reference for the two MoE routers, written from the formulas.

It must not import `engine`: it is the oracle the engine is checked against. Besides ids and
weights it returns, per token, the deciding values of every expert (`scores`: the logits for
softmax_topk, which selects on them since softmax is monotonic; the biased sigmoid scores for
noaux_tc) and the grouping, so that a test can tell a genuine mismatch from a near-tie that
float32 rounding (or a different tie-break rule) may legitimately resolve the other way
(`verifier.tolerance.routing_bounds`), and the decision margins for reports:

- `select_margin`: gap between the k-th and the (k+1)-th selection value among the kept experts
  (inf when the kept experts number exactly k);
- `group_margin`: gap between the topk_group-th and the next group score (inf when every group is
  kept, and for softmax_topk which has no groups).

Ties are broken towards the lower expert / group index (stable sort); the engine may break them
the other way, which only matters for near-tied tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RENORM_EPS = 1e-20  # the DeepSeek-V3 / GLM-4.5 reference adds this to the renormalisation sum


@dataclass(frozen=True)
class Routing:
    """Reference routing of T tokens. Arrays are per token row."""

    ids: np.ndarray  # [T, k] int64, ordered by descending selection score
    weights: np.ndarray  # [T, k] float64
    kept_groups: np.ndarray  # [T, G] bool (G = 1 for softmax_topk)
    select_margin: np.ndarray  # [T] float64
    group_margin: np.ndarray  # [T] float64
    scores: np.ndarray  # [T, E] float64 deciding values: logits, or sigmoid scores + bias
    topk_group: int = 1

    @property
    def margin(self) -> np.ndarray:
        """[T] the smaller of the two decision margins."""
        return np.minimum(self.select_margin, self.group_margin)


def softmax_topk(logits, *, top_k, norm_topk_prob) -> Routing:
    """Qwen3-MoE: the top_k of softmax over all experts (the top_k logits: float64 exp underflows
    to 0 past ~745 nats, the logits never tie where the probabilities differ), weighted by their
    probabilities, divided by the sum when norm_topk_prob."""
    x = np.asarray(logits, dtype=np.float64)  # [T, E]
    ids, select_margin = _top(x, top_k)
    weights = np.take_along_axis(softmax(x), ids, axis=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    kept = np.ones((x.shape[0], 1), dtype=bool)
    return Routing(ids, weights, kept, select_margin, np.full(x.shape[0], np.inf), x)


def noaux_tc(logits, bias, *, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor) -> Routing:
    """DeepSeek-V3 / GLM-4.5 grouped routing, bias None meaning zeros (see module docstring)."""
    x = np.asarray(logits, dtype=np.float64)  # [T, E]
    scores = sigmoid(x)  # [T, E]
    selection = scores + (0.0 if bias is None else np.asarray(bias, dtype=np.float64))
    kept, group_margin = _kept_groups(selection, n_group, topk_group)  # [T, G]
    per_expert = np.repeat(kept, x.shape[1] // n_group, axis=1)  # [T, E]
    ids, select_margin = _top(np.where(per_expert, selection, -np.inf), top_k)
    weights = np.take_along_axis(scores, ids, axis=-1)  # [T, k], unbiased
    if norm_topk_prob:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + RENORM_EPS)
    return Routing(ids, weights * routed_scaling_factor, kept, select_margin, group_margin, selection,
                   topk_group)


def softmax(logits) -> np.ndarray:
    """[T, E] float64 probabilities over the last axis."""
    x = np.asarray(logits, dtype=np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def sigmoid(logits) -> np.ndarray:
    """[T, E] float64 noaux_tc scores."""
    with np.errstate(over="ignore"):  # exp(-x) = inf for x < -709: the score is then exactly 0
        return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))


def _kept_groups(selection, n_group, topk_group):
    """([T, G] bool kept groups, [T] margin) with groups scored by the sum of their top-2."""
    tokens, experts = selection.shape
    grouped = np.sort(selection.reshape(tokens, n_group, experts // n_group), axis=-1)
    group_scores = grouped[..., -1] + grouped[..., -2]  # [T, G]
    best, margin = _top(group_scores, topk_group)
    kept = np.zeros_like(group_scores, dtype=bool)
    np.put_along_axis(kept, best, True, axis=-1)
    return kept, margin


def _top(values, k):
    """(indices of the k largest per row, lowest index first on ties; [T] gap to the next one)."""
    order = np.argsort(-values, axis=-1, kind="stable")  # [T, N]
    ranked = np.take_along_axis(values, order, axis=-1)
    if k == values.shape[-1]:
        margin = np.full(values.shape[0], np.inf)
    else:
        margin = ranked[:, k - 1] - ranked[:, k]  # -inf next value gives +inf
    return order[:, :k].astype(np.int64), margin
