"""Verdicts against a float64 truth: is A as close to the exact answer as B is?

`judge(actual, reference, truth)` takes three dumps of the same prompts (engine/dump.py keys):
A the run under test, B the reference run, T a float64 run (the truth). It answers per key:

  float keys     (logits_p{i}, greedy_logits_p{i}) each side's error against T, as the relative
                 L2 norm of the whole key (||X - T||_2 / ||T||_2 over every element of one prompt's
                 array, `verifier.compare.rel_l2`). A fails the key when its error exceeds
                 max(TRUTH_RATIO * B's error, TRUTH_FLOOR) (verifier/tolerance.py): the floor is
                 the bound when B is exact or nearly so.
  token flips    (greedy_p{i}) the first step where A and B choose different tokens is judged on
                 T's logits at that step: a side's token is admissible when no token decisively
                 beats it under TOKEN_NEAR_TIE (a top-1 routing over the vocabulary: judged by
                 verifier/routing.py). Both admissible: noise. Otherwise the inadmissible side is
                 named wrong and the key fails.
  expert flips   (topk_ids / decode_topk_ids) each row where A's expert set differs from B's is
                 judged on T's deciding values (`topk_margin_*` keys, verifier/dumps.py) under
                 NEAR_TIE, by the same routing.py rule; both admissible: noise (a near-tie row),
                 otherwise the inadmissible side is named wrong and the key fails.

A flip that is not noise fails whichever side is wrong: the two runs disagree beyond float32
rounding, so one of them has a bug, and the report names it. Float keys fail only when A is the
worse side (B worse than A is not A's failure).

After the step where A's, B's or T's greedy tokens first part, the three runs decode different
contexts: later greedy-logit rows and decode routing rows are not judged (the report says how
many). Integer keys other than these (input_ids) must be equal in all three dumps, or the truth
is not a run of the same prompts.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

import numpy as np

from verifier.compare import json_safe, rel_l2
from verifier.dumps import GROUPING_KEY, ROUTING_KEY
from verifier.recording import note_verdict
from verifier.routing import routing_failures
from verifier.tolerance import NEAR_TIE, TOKEN_NEAR_TIE, TRUTH_FLOOR, TRUTH_RATIO, NearTie

FLOAT_KEY = re.compile(r"^(greedy_)?logits_p(\d+)$")
TOKEN_KEY = re.compile(r"^greedy_p(\d+)$")
INPUT_KEY = re.compile(r"^input_ids_p(\d+)$")


class TruthError(ValueError):
    """The truth cannot judge these dumps (wrong keys, dtype or prompts); the message names which."""


@dataclass(frozen=True)
class FloatVerdict:
    """One float key: each side's error against the truth and the bound A's error must keep."""

    key: str
    actual_error: float  # rel L2 of A against T
    reference_error: float  # rel L2 of B against T
    bound: float  # max(ratio * reference_error, floor)
    ratio: float
    floor: float
    rows: int  # rows judged (greedy logits: up to where the tokens part)

    @property
    def passed(self) -> bool:
        return self.actual_error <= self.bound  # a NaN error fails

    @property
    def times(self) -> float:
        """A's error in units of B's (inf when B is exact and A is not; 1 when both are exact)."""
        if self.reference_error == 0:
            return 1.0 if self.actual_error == 0 else math.inf
        return self.actual_error / self.reference_error

    def words(self) -> str:
        """The verdict in words: 'within noise: 1.3 times the reference's error' / 'bug: 4.1e4 times
        the reference's error', then A's error and the bound that decided (the floor or the ratio)."""
        head = "within noise" if self.passed else "bug"
        limit = "under" if self.passed else "over"
        decided = (f"the floor {self.floor:.2g}" if self.bound == self.floor
                   else f"{self.ratio:g} x the reference's error = {self.bound:.2g}")
        detail = f"error {self.actual_error:.2g} against the truth, {limit} {decided}"
        if self.reference_error == 0:
            return f"{head}: {detail} (the reference is exact)"
        return f"{head}: {_times(self.times)} times the reference's error ({detail})"

    def to_dict(self) -> dict:
        return json_safe({"kind": "float", **asdict(self), "times": self.times, "passed": self.passed,
                           "verdict": self.words()})


@dataclass(frozen=True)
class Flip:
    """One position where A and B chose differently, judged on the truth's deciding values."""

    key: str
    position: int  # greedy step or routing row
    actual: tuple[int, ...]
    reference: tuple[int, ...]
    truth: tuple[int, ...] | None  # T's own choice there (None when T's dump lacks it)
    margin: float  # the gap between T's deciding values of the swapped choices (nan: unknown)
    margin_of: str  # what `margin` measures ("logits", "expert values", "group scores")
    bound: float  # the near-tie bound at those values: a gap within it is float32 noise
    wrong: str  # "", "actual", "reference" or "both"
    reason: str = ""  # why the wrong side is wrong (routing.py's words)

    @property
    def noise(self) -> bool:
        return not self.wrong

    def words(self) -> str:
        gap = f"the truth's {self.margin_of} gap {self.margin:.3g}"
        if self.noise:
            return f"within noise: {gap} is within the float32 bound {self.bound:.3g}"
        side = {"actual": "A (the run under test)", "reference": "B (the reference)", "both": "A and B"}[self.wrong]
        why = f": {self.reason}" if self.reason else ""
        return f"bug: {side} disagrees with the truth ({gap}, float32 bound {self.bound:.3g}){why}"

    def to_dict(self) -> dict:
        return json_safe({"kind": "flip", **asdict(self), "noise": self.noise, "verdict": self.words()})


@dataclass
class TruthVerdict:
    """Every judgement of one (A, B, T) triple; `passed` when no float key fails and no flip is a bug."""

    floats: list[FloatVerdict] = field(default_factory=list)
    flips: list[Flip] = field(default_factory=list)
    unjudged: dict[str, int] = field(default_factory=dict)  # key -> rows after the tokens part
    routing_keys: list[str] = field(default_factory=list)  # every routing key judged
    token_keys: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(v.passed for v in self.floats) and all(f.noise for f in self.flips)

    def failures(self) -> list[str]:
        out = [f"{v.key}: {v.words()}" for v in self.floats if not v.passed]
        return out + [f"{f.key} {_where(f)}: {f.words()}" for f in self.flips if not f.noise]


def judge(actual: dict, reference: dict, truth: dict, ratio: float = TRUTH_RATIO, floor: float = TRUTH_FLOOR,
          token_rule: NearTie = TOKEN_NEAR_TIE, routing_rule: NearTie = NEAR_TIE) -> TruthVerdict:
    """Judge A against B on the float64 truth T (module docstring). Raises TruthError when T does
    not hold the keys of A and B, holds a float key not in float64, or ran other prompts."""
    check_truth(actual, truth)
    only = sorted(set(_judged(actual)) ^ set(_judged(reference)))
    if only:
        raise TruthError(f"A and B do not hold the same keys: {only[:5]} in one of them only")
    verdict = TruthVerdict()
    parted = {p: _parting_step(actual, reference, truth, p) for p in _prompts(reference)}
    for key in sorted(reference):
        if FLOAT_KEY.match(key):
            verdict.floats.append(_float_verdict(key, actual, reference, truth, parted, ratio, floor))
        elif TOKEN_KEY.match(key):
            verdict.token_keys.append(key)
            verdict.flips += _token_flips(key, actual[key], reference[key], truth, token_rule, verdict.unjudged)
        elif ROUTING_KEY.match(key):
            verdict.routing_keys.append(key)
            verdict.flips += _routing_flips(key, actual, reference, truth, parted, routing_rule, verdict.unjudged)
    return verdict


def assert_truth(actual: dict, reference: dict, truth: dict, **rules) -> TruthVerdict:
    """`judge`, recorded on the gate's report (one entry per key), raising AssertionError that
    lists every failure in words unless A passed; returns the verdict."""
    verdict = judge(actual, reference, truth, **rules)
    record(verdict)
    if not verdict.passed:
        problems = verdict.failures()
        raise AssertionError(f"{len(problems)} divergence(s) against the float64 truth:\n" + "\n".join(problems))
    return verdict


def record(verdict: TruthVerdict) -> TruthVerdict:
    """Note every judged key on the open recording (verifier/recording.py); a no-op without one."""
    for kind, passed, item, noise_rows in report_items(verdict):
        note_verdict(kind, passed, item, noise_rows)
    return verdict


def report_items(verdict: TruthVerdict) -> list[tuple[str, bool, dict, tuple[int, ...]]]:
    """(kind, passed, comparison item, positions within noise) per judged key, in the report's
    comparison form (verifier/report.py) with a `truth` field holding the numbers."""
    items = []
    for v in verdict.floats:
        items.append(("numeric", v.passed, {
            "name": v.key, "passed": v.passed, "message": v.words(),
            "tolerance": f"rel L2 to the truth <= max({v.ratio:g} x the reference's, {v.floor:.2g})",
            "tolerance_source": "verifier/tolerance.py, TRUTH_RATIO and TRUTH_FLOOR", "truth": v.to_dict()}, ()))
    for kind, keys, rule in (("tokens", verdict.token_keys, "TOKEN_NEAR_TIE"), ("routing", verdict.routing_keys, "NEAR_TIE")):
        for key in keys:
            flips = [f for f in verdict.flips if f.key == key]
            passed = all(f.noise for f in flips)
            message = "; ".join(f"{_where(f)}: {f.words()}" for f in flips if not f.noise)
            items.append((kind, passed, {
                "name": key, "passed": passed, "message": message,
                "tolerance": "flips within noise on the truth's margins",
                "tolerance_source": f"verifier/tolerance.py, {rule}",
                "truth": {"kind": "flips", "flips": [f.to_dict() for f in flips],
                          "unjudged": verdict.unjudged.get(key, 0)}},
                tuple(f.position for f in flips if f.noise)))
    return items


def rows(verdict: TruthVerdict) -> list[dict]:
    """Every float key and every flip as plain data: the JSON report's `truth` list."""
    return [v.to_dict() for v in verdict.floats] + [f.to_dict() for f in verdict.flips]


def _where(flip: Flip) -> str:
    return f"{'step' if TOKEN_KEY.match(flip.key) else 'row'} {flip.position}"


def check_truth(dump: dict, truth: dict) -> None:
    """T holds every comparable key of `dump`, its float keys in float64, and the same prompts."""
    keys = _judged(dump)
    missing = sorted(k for k in keys if k not in truth)
    if missing:
        raise TruthError(f"the truth lacks {len(missing)} key(s) the dumps hold, first {missing[0]}")
    for key in keys:
        if FLOAT_KEY.match(key) and truth[key].dtype != np.float64:
            raise TruthError(f"the truth's {key} is {truth[key].dtype}, not float64: not a float64 run")
        if INPUT_KEY.match(key) and not np.array_equal(truth[key], dump[key]):
            raise TruthError(f"the truth's {key} differs from the dumps': not a run of the same prompts")
        if truth[key].shape[1:] != dump[key].shape[1:]:
            raise TruthError(f"the truth's {key} has shape {truth[key].shape}, the dumps' {dump[key].shape}")


def _judged(dump: dict) -> list[str]:
    """The keys a verdict reads: float outputs, tokens, routing, and the prompts' input ids."""
    return [k for k in dump if FLOAT_KEY.match(k) or TOKEN_KEY.match(k) or ROUTING_KEY.match(k) or INPUT_KEY.match(k)]


def _prompts(dump: dict) -> list[int]:
    return sorted(int(m.group(1)) for k in dump if (m := TOKEN_KEY.match(k)))


def _parting_step(actual: dict, reference: dict, truth: dict, prompt: int) -> int:
    """The first greedy step where any two of A, B and T choose different tokens (their length if none)."""
    key = f"greedy_p{prompt}"
    a, b, t = actual[key], reference[key], truth[key]
    n = min(len(a), len(b), len(t))
    differ = np.flatnonzero((a[:n] != b[:n]) | (a[:n] != t[:n]))
    return int(differ[0]) if differ.size else n


def _float_verdict(key, actual, reference, truth, parted, ratio, floor) -> FloatVerdict:
    """Rel L2 of each side against T; greedy logits only up to the parting step (row p was computed
    from tokens all three agree on; later rows were not)."""
    a, b, t = actual[key], reference[key], truth[key]
    match = FLOAT_KEY.match(key)
    if match.group(1):  # greedy logits
        rows = parted[int(match.group(2))] + 1
        a, b, t = a[:rows], b[:rows], t[:rows]
    if a.shape != t.shape or b.shape != t.shape:
        raise TruthError(f"{key}: shapes A {a.shape}, B {b.shape}, truth {t.shape}")
    err_a, err_b = rel_l2(a, t), rel_l2(b, t)
    bound = max(ratio * err_b, floor) if math.isfinite(err_b) else floor
    return FloatVerdict(key, err_a, err_b, bound, ratio, floor, len(t))


def _token_flips(key: str, a: np.ndarray, b: np.ndarray, truth: dict, rule: NearTie, unjudged: dict) -> list[Flip]:
    """The first step where A and B choose differently, judged on T's logits there (later steps
    follow different contexts). A top-1 choice over the vocabulary is a routing with k = 1. When
    T parted from both earlier, that step is judged instead (A's token against T's, A and B
    agreeing), and the later A/B flip is left unjudged: T's logits there follow another context."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    if not differ.size:
        return []
    step, t_tokens = int(differ[0]), truth[key]
    t_logits = truth[key.replace("greedy_p", "greedy_logits_p")]
    t_parted = np.flatnonzero(t_tokens[:step] != a[:step])
    if t_parted.size:
        unjudged[key] = n - step
        step = int(t_parted[0])
        b = a  # A and B agree up to here
    values = np.asarray(t_logits[step], np.float64)[None]  # [1, V]
    return [_flip(key, step, (int(a[step]),), (int(b[step]),), (int(t_tokens[step]),), values, 1, 1, rule, "logits")]


def _routing_flips(key, actual, reference, truth, parted, rule, unjudged) -> list[Flip]:
    """Rows where A's expert set differs from B's, judged on T's deciding values (topk_margin_*)."""
    a, b = actual[key], reference[key]
    if a.shape != b.shape:
        raise TruthError(f"{key}: A has shape {a.shape}, B {b.shape}")
    rows = len(b)
    if key.startswith("decode_"):  # decode row j processes token j: comparable while tokens 0..j agree
        rows = min(rows, parted[int(ROUTING_KEY.match(key).group(2))])
        if rows < len(b):
            unjudged[key] = len(b) - rows
    differ = np.flatnonzero((np.sort(a[:rows], -1) != np.sort(b[:rows], -1)).any(-1))
    if not differ.size:
        return []
    values = truth.get(key.replace("topk_ids", "topk_margin"))
    grouping = truth.get(GROUPING_KEY)
    n_group, topk_group = (1, 1) if grouping is None else (int(grouping[0]), int(grouping[1]))
    t_ids = truth[key]
    return [_flip(key, int(r), tuple(int(i) for i in a[r]), tuple(int(i) for i in b[r]),
                  tuple(int(i) for i in t_ids[r]), None if values is None else values[r][None],
                  n_group, topk_group, rule, "expert values") for r in differ]


def _flip(key, position, a_ids, b_ids, t_ids, values, n_group, topk_group, rule, margin_of) -> Flip:
    """Judge each side's choice on T's deciding values `values` [1, E] (None: T carries none, so
    a side that differs from T's own choice is wrong and no flip is noise)."""
    if values is None:
        wrong = _side(set(a_ids) != set(t_ids), set(b_ids) != set(t_ids)) or "both"
        return Flip(key, position, a_ids, b_ids, t_ids, math.nan, margin_of, math.nan, wrong,
                    "the truth carries no deciding values (topk_margin keys) to call a flip noise")
    fail_a = routing_failures(np.asarray([a_ids]), values, n_group, topk_group, rule)
    fail_b = routing_failures(np.asarray([b_ids]), values, n_group, topk_group, rule)
    margin, margin_of, first, second = _margin(values[0], a_ids, b_ids, t_ids, n_group, margin_of)
    bound = rule.atol + rule.rtol * max(abs(first), abs(second))
    reason = "; ".join(f"{side}: {f[0].reason}" for side, f in (("A", fail_a), ("B", fail_b)) if f)
    return Flip(key, position, a_ids, b_ids, t_ids, margin, margin_of, bound, _side(bool(fail_a), bool(fail_b)), reason)


def _side(actual_wrong: bool, reference_wrong: bool) -> str:
    return {(False, False): "", (True, False): "actual", (False, True): "reference", (True, True): "both"}[
        (actual_wrong, reference_wrong)]


def _margin(values: np.ndarray, a_ids, b_ids, t_ids, n_group: int, margin_of: str) -> tuple[float, str, float, float]:
    """(gap, what it measures, first, second): the largest gap between T's values of the choices
    only A made and those only B made (only T made, when A and B agree), paired in descending
    order; for experts of different groups (noaux_tc), the gap between their groups' scores (the
    sum of each group's top-2)."""
    other = t_ids if set(a_ids) == set(b_ids) else b_ids
    only_a = sorted((i for i in a_ids if i not in other), key=lambda i: -values[i])
    only_o = sorted((i for i in other if i not in a_ids), key=lambda i: -values[i])
    size = len(values) // n_group
    scores = np.sort(values.reshape(n_group, size), axis=-1)[:, -2:].sum(-1)
    best = (math.nan, margin_of, 0.0, 0.0)
    for x, y in zip(only_a, only_o):
        if n_group > 1 and x // size != y // size:
            first, second, what = scores[x // size], scores[y // size], "group scores"
        else:
            first, second, what = values[x], values[y], margin_of
        if not abs(first - second) <= best[0]:  # the first pair, then any larger gap
            best = (float(abs(first - second)), what, float(first), float(second))
    return best


def _times(value: float) -> str:
    """1.3, 12, 410, 4.1e4: two significant digits under 10, whole numbers to 1000, then scientific."""
    if not math.isfinite(value):
        return str(value)
    if value < 10:
        return f"{value:.2g}"
    return f"{value:.0f}" if value < 1e3 else f"{value:.1e}".replace("e+0", "e").replace("e+", "e")
