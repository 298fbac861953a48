"""Hypothesis strategies for the graph cases (token counts, capture-size lists, batch compositions)
and for the router cases (routing problems whose corners every profile reaches).

Graph bugs live at the edges of the capture sizes (a step of s - 1, s or s + 1 tokens pads
differently), so every token-count strategy draws those boundaries about half the time and any
count the rest. Compositions are plain data (`batches.Part`s plus a seed for the token ids);
`batches.staged` turns one into a real `Batch` on a runner.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import numpy as np
from batches import Composition, Part
from hypothesis import assume, settings
from hypothesis import strategies as st
from router_checks import PADDING_VALUES, Case, pad

MAX_POSITIONS = 512  # max_position_embeddings of every bundled fixture checkpoint
MAX_SEQS = 6  # sequences in one drawn step
KINDS = ("prefill", "mixed", "decode")  # prefill chunks only / chunks and decodes / decodes only


def scaled_examples(fraction: float, minimum: int = 2) -> int:
    """A share of the active profile's max_examples (ci 25, nightly 2000), for properties whose
    examples are model runs: the profile still scales them."""
    return max(minimum, round(settings.default.max_examples * fraction))


def ci_examples(ci: int, fraction: float) -> int:
    """`ci` drawn examples under the `ci` profile (max_examples 25), else `fraction` of the profile's
    count (scaled_examples): the gate keeps few model runs per case, every other profile its reach."""
    return ci if settings.default.max_examples <= 25 else scaled_examples(fraction)


def padded_to(sizes: Sequence[int], num_tokens: int) -> int | None:
    """Reference rounding, independent of the engine: the smallest size >= num_tokens, else None."""
    return next((s for s in sorted(sizes) if s >= num_tokens), None)


def boundaries(sizes: Sequence[int], cap: int) -> list[int]:
    """s - 1, s and s + 1 for every capture size s, within [1, cap]."""
    return sorted({v for s in sizes for v in (s - 1, s, s + 1) if 1 <= v <= cap})


def token_counts(sizes: Sequence[int], cap: int, low: int = 1) -> st.SearchStrategy[int]:
    """Token counts in [low, cap], a capture-size boundary about half the time."""
    edges = [v for v in boundaries(sizes, cap) if v >= low]
    anywhere = st.integers(low, cap)
    return st.one_of(st.sampled_from(edges), anywhere) if edges else anywhere


def capture_size_lists(max_size: int = 8192, max_len: int = 12, min_size: int = 1) -> st.SearchStrategy:
    """Valid capture-size lists: sorted, unique, within [min_size, max_size]."""
    values = st.integers(min_size, max_size)
    return st.lists(values, min_size=1, max_size=max_len, unique=True).map(lambda xs: tuple(sorted(xs)))


# ---------------------------------------------------------------------------- compositions


@st.composite
def prefill_parts(draw, length: int, max_cached: int) -> Part:
    """A prompt chunk of `length` tokens, with or without a cached prefix before it and with or
    without prompt tokens left after it (a chunk that does not sample)."""
    room = MAX_POSITIONS - length
    cached = draw(st.one_of(st.just(0), st.integers(0, min(room, max_cached))))
    rest = draw(st.one_of(st.just(0), st.integers(0, room - cached)))
    return Part(cached=cached, new=length, rest=rest)


@st.composite
def decode_parts(draw, max_cached: int) -> Part:
    """One decode token after a context of 1..max_cached cached tokens."""
    return Part(cached=draw(st.integers(1, min(MAX_POSITIONS - 1, max_cached))), new=1, decode=True)


@st.composite
def split(draw, total: int, pieces: int) -> list[int]:
    """`total` as `pieces` positive lengths."""
    if pieces == 1:
        return [total]
    cuts = draw(st.lists(st.integers(1, total - 1), min_size=pieces - 1, max_size=pieces - 1, unique=True))
    bounds = [0, *sorted(cuts), total]
    return [b - a for a, b in pairwise(bounds)]


@st.composite
def compositions(draw, prefill_sizes: Sequence[int], decode_sizes: Sequence[int], max_tokens: int,
                 kinds: Sequence[str] = KINDS, total: int | None = None, max_seqs: int = MAX_SEQS,
                 max_cached: int = MAX_POSITIONS - 1) -> Composition:
    """One step's batch: prefill chunks (with and without cached prefix) and/or decodes, in any
    order. The token count leans on the capture-size boundaries of its phase (decode sizes for
    decode-only steps) unless `total` fixes it; it never exceeds `max_tokens`."""
    kind = draw(st.sampled_from([k for k in kinds if _possible(k, total or max_tokens, max_seqs, total is None)]))
    if kind == "decode":
        n = total or draw(token_counts(decode_sizes, min(max_seqs, max_tokens)))
        parts = [draw(decode_parts(max_cached)) for _ in range(n)]
    else:
        n = total or draw(token_counts(prefill_sizes, max_tokens, low=2 if kind == "mixed" else 1))
        decodes = draw(st.integers(1, min(n - 1, max_seqs - 1))) if kind == "mixed" else 0
        chunks = draw(st.integers(1, min(n - decodes, max_seqs - decodes)))
        parts = [draw(decode_parts(max_cached)) for _ in range(decodes)]
        parts += [draw(prefill_parts(length, max_cached)) for length in draw(split(n - decodes, chunks))]
    return Composition(tuple(draw(st.permutations(parts))), draw(st.integers(0, 2**32 - 1)))


def _possible(kind: str, tokens: int, max_seqs: int, up_to: bool) -> bool:
    """Whether a step of this kind can hold `tokens` tokens (up to that many, when `up_to`)."""
    return {"decode": up_to or tokens <= max_seqs, "mixed": tokens >= 2, "prefill": True}[kind]


@st.composite
def same_size_pairs(draw, prefill_sizes: Sequence[int], decode_sizes: Sequence[int],
                    max_seqs: int = MAX_SEQS, max_cached: int = MAX_POSITIONS - 1) -> tuple[Composition, Composition]:
    """(A, B): two steps of one phase that replay the same capture size, A padded and B with more
    real rows than A, so B's rows land in what is padding for A."""
    decode_room = [s for s in decode_sizes if s <= max_seqs]
    kind = draw(st.sampled_from(KINDS if decode_room else ("prefill", "mixed")))
    cap = max(decode_room) if kind == "decode" else max(prefill_sizes)  # a replayed size, not a fallback
    first = draw(compositions(prefill_sizes, decode_room, cap, (kind,), max_seqs=max_seqs, max_cached=max_cached))
    size = padded_to(decode_room if first.is_decode_only else prefill_sizes, first.num_tokens)
    assume(first.num_tokens < size)  # A must have padded rows for B's rows to land in (stale padding)
    low = first.num_tokens + 1
    kinds = ("decode",) if first.is_decode_only else ("prefill", "mixed")
    second = draw(compositions(prefill_sizes, decode_room, size, kinds, total=draw(st.integers(low, size)),
                               max_seqs=max_seqs, max_cached=max_cached))
    return first, second


@st.composite
def prompt_sets(draw, vocab: int, max_prompts: int = 4, max_len: int = 48) -> list[tuple[int, ...]]:
    """A few prompts of seeded random token ids; lengths lean on 1 and on max_len."""
    lengths = st.one_of(st.sampled_from([1, max_len]), st.integers(1, max_len))
    count = draw(st.integers(1, max_prompts))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return [tuple(int(t) for t in rng.integers(0, vocab, draw(lengths))) for _ in range(count)]


# ---------------------------------------------------------------------------- routing problems

# Logit spreads: "narrow" is what trained routers mostly emit; "wide" spreads rows over tens to
# hundreds of nats, past the -64 clip of Paddle's CPU softmax and float32 exp's range; "huge"
# magnitudes reach 1e37, where x - max overflows and sigmoid saturates to exact 0 / 1 ties.
SPREADS = ("narrow", "narrow", "wide", "huge")


@st.composite
def logit_arrays(draw, tokens: int, experts: int) -> np.ndarray:
    """[tokens, experts] float32 logits of one spread, often with exact ties (a coarse grid,
    duplicated columns)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    spread = draw(st.sampled_from(SPREADS))
    scale = {"narrow": draw(st.sampled_from([0.5, 2.0, 4.0])), "wide": draw(st.sampled_from([20.0, 60.0, 150.0])),
             "huge": 10.0 ** draw(st.integers(5, 37))}[spread]
    logits = rng.normal(0.0, scale, (tokens, experts))
    grid = draw(st.sampled_from([None, None, 0.25, 0.0625]))
    if grid:
        logits = np.round(logits / (grid * scale)) * (grid * scale)
    if draw(st.booleans()):
        copies = rng.integers(0, experts, size=experts // 4)
        logits[:, rng.integers(0, experts, size=copies.size)] = logits[:, copies]
    limit = 8.0 if spread == "narrow" else float(np.finfo(np.float32).max) / 4
    return np.clip(logits, -limit, limit).astype(np.float32)


# None, zeros, small, large (positive and negative), all-negative (every biased score below 0, so a
# masked group filled with 0 instead of -inf outranks every kept expert), and mixed-sign biases.
BIAS_KINDS = ("none", "zeros", "small", "large", "negative", "negative", "mixed")


@st.composite
def biases(draw, experts: int):
    """None or a float32 [experts] correction bias of one of BIAS_KINDS."""
    kind = draw(st.sampled_from(BIAS_KINDS))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = {"none": 0.0, "zeros": 0.0, "small": 0.01, "large": 1.0, "negative": 0.5, "mixed": 0.5}[kind]
    bias = rng.normal(0.0, 1.0, experts) * scale - (2.0 if kind == "negative" else 0.0)
    if kind == "mixed":
        bias = np.abs(bias) * np.where(np.arange(experts) % 2, 1.0, -1.0)  # both signs in every group
    return None if kind == "none" else bias.astype(np.float32)


@st.composite
def noaux_cases(draw, max_tokens: int = 64) -> Case:
    """noaux_tc problems; groups of exactly two experts, topk_group == n_group (nothing masked),
    topk_group < n_group (a masked group) and top_k = 1 each come up often."""
    n_group = draw(st.integers(1, 8))
    group_size = draw(st.one_of(st.just(2), st.integers(2, 64 // n_group)))
    topk_group = draw(st.one_of(st.just(n_group), st.just(max(1, n_group - 1)), st.integers(1, n_group)))
    top_k = draw(st.one_of(st.just(1), st.integers(1, min(8, topk_group * group_size))))
    case = Case("noaux_tc", draw(_logits(max_tokens, n_group * group_size)), top_k,
                draw(st.booleans()), draw(biases(n_group * group_size)), n_group, topk_group,
                draw(st.sampled_from([1.0, 2.5, 0.7])))
    return draw(_maybe_padded(case))


@st.composite
def softmax_cases(draw, max_tokens: int = 64) -> Case:
    """softmax_topk problems, top_k = 1 often, renormalised or not."""
    experts = draw(st.integers(1, 64))
    top_k = draw(st.one_of(st.just(1), st.integers(1, min(8, experts))))
    case = Case("softmax_topk", draw(_logits(max_tokens, experts)), top_k, draw(st.booleans()))
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
