"""The capture-safety lint (verifier/capture_lint.py): planted patterns are flagged with the right
piece, rule and line; the engine's own pieces have no finding.

Toy pieces are traced the way the engine traces its pieces: a named function whose body Paddle's
converter leaves alone (`not_to_static`), except where a case needs the converter itself. Each
planted line carries a `# planted: TAG` comment; the expected line number is read from this
file's text, not from the lint.
"""

from __future__ import annotations

from pathlib import Path

import paddle
import pytest
from paddle.jit.dy2static.convert_operators import convert_load

import engine.models.moe_decoder as moe_decoder
import engine.moe.router as router_module
from engine.graph.backends import StaticBackend
from engine.hf_config import read_model_config
from fixtures.pytest_fixtures import CHECKPOINT_NAMES, checkpoint_dir
from verifier.capture_lint import lint_captures, lint_model, main
from verifier.capture_program import CapturedPiece, lint_piece
from verifier.capture_rules import RULES

SOURCE = Path(__file__).read_text().splitlines()
WEIGHT = paddle.full([4, 4], 0.5)  # a weight the toy pieces own
STALE = paddle.ones([1, 4])  # a per-step value a buggy piece reads instead of taking it as an input


def planted(tag: str) -> int:
    """The line number of the `# planted: tag` comment in this file."""
    return next(i for i, line in enumerate(SOURCE, 1) if line.rstrip().endswith(f"# planted: {tag}"))


def at_line(finding, line: int) -> bool:
    return finding.line.split(" in ")[0].endswith(f"test_capture_lint.py:{line}")


def inputs(size: int = 8) -> list[paddle.Tensor]:
    return [paddle.randn([size, 4]), paddle.to_tensor([3], dtype="int64")]


@paddle.jit.not_to_static
def _clean(x, n):
    rows = paddle.arange(x.shape[0], dtype="int64").unsqueeze(-1)
    return (paddle.where(rows < n, paddle.matmul(x, convert_load(WEIGHT)), paddle.zeros_like(x)),)


@paddle.jit.not_to_static
def _nonzero(x, n):
    kept = paddle.nonzero(x[:, 0] > 0)  # planted: nonzero
    return (x * 2, kept)


@paddle.jit.not_to_static
def _numpy(x, n):
    scale = float(x.numpy().max())  # planted: numpy
    return (x * scale,)


def _numpy_converted(x, n):  # converted by Paddle's AST converter, which deletes the .numpy() call
    return (x * paddle.to_tensor(x.numpy()),)  # planted: numpy-converted


@paddle.jit.not_to_static
def _eager_read(x, n):
    return (x * float(STALE.numpy().max()),)  # planted: eager-read


@paddle.jit.not_to_static
def _item(x, n):
    count = n.item()  # planted: item
    return (x * count,)


@paddle.jit.not_to_static
def _print(x, n):
    print("hidden", x)  # planted: print
    return (x * 2,)


@paddle.jit.not_to_static
def _print_op(x, n):
    return (paddle.static.Print(x * 2),)  # planted: print-op


def _closed_over(x, n):  # converted by Paddle's AST converter, which turns STALE into a program parameter
    return (x + STALE,)  # planted: closed-over


@paddle.jit.not_to_static
def _dropout(x, n):
    return (paddle.nn.functional.dropout(x, 0.1),)  # planted: dropout


@paddle.jit.not_to_static
def _tensor_bound(x, n):
    return (x[: n[0]] * 2,)  # planted: tensor-bound


@paddle.jit.not_to_static
def _baked(x, n):
    return (x + paddle.to_tensor([[1.0, 2.0, 3.0, 4.0]]),)  # planted: baked


KEPT: list = []  # where a buggy piece leaves a result for the host to read after the step


@paddle.jit.not_to_static
def _kept(x, n):
    KEPT.append(x * 3)  # planted: kept
    return (x * 2,)


@paddle.jit.not_to_static
def _inplace(x, n):
    paddle.assign(x * 2, output=x)  # planted: inplace
    return (x + 1,)


@paddle.jit.not_to_static
def _passthrough(x, n):
    return (x * 2, x)  # no op records this line: the finding names the piece function


@paddle.jit.not_to_static
def _broadcast(x, n):
    y = x * 2
    paddle.distributed.broadcast(y, src=0)  # planted: broadcast
    return (y,)


@paddle.jit.not_to_static
def _all_reduce(x, n):
    y = x * 2
    paddle.distributed.all_reduce(y)
    return (y,)


def piece(body):
    """A toy piece as the engine hands one to the backend: a named function of its inputs."""

    def toy_piece(x, n):  # planted: piece
        return body(x, n)

    return toy_piece


def lint_one(body, size: int = 8):
    return lint_captures([("toy", size, piece(body), inputs(size))], owned=[WEIGHT])


@pytest.mark.parametrize("body", [_clean, _all_reduce], ids=["clean", "all_reduce"])
def test_a_clean_toy_piece_has_no_finding(body):
    assert lint_one(body) == []


@pytest.mark.parametrize("body, tag, rule, op", [
    (_nonzero, "nonzero", "data-dependent-shape", "pd_op.nonzero"),
    (_numpy, "numpy", "host-read", "Value.numpy"),
    (_numpy_converted, "numpy-converted", "host-read", ".numpy() (erased by the converter)"),
    (_eager_read, "eager-read", "host-read", "Tensor.numpy"),
    (_item, "item", "host-read", "Value.item"),
    (_print, "print", "host-read", "Value.__repr__"),
    (_print_op, "print-op", "host-sync", "pd_op.print"),
    (_closed_over, "closed-over", "closed-over-tensor", "builtin.parameter"),
    (_dropout, "dropout", "unseeded-random", "pd_op.dropout"),
    (_tensor_bound, "tensor-bound", "dynamic-shape", "pd_op.slice"),
    (_kept, "kept", "escaped-output", "pd_op.scale"),
    (_baked, "baked", "baked-host-data", "pd_op.assign_value_"),
    (_inplace, "inplace", "foreign-inplace", "pd_op.assign_out_"),
    (_passthrough, "piece", "escaped-output", "pd_op.data"),
    (_broadcast, "broadcast", "uncapturable-collective", "pd_op.broadcast_"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_a_planted_pattern_is_flagged_with_its_piece_size_and_line(body, tag, rule, op):
    findings = lint_one(body, size=12)
    hits = [f for f in findings if f.rule == rule and f.op == op]
    assert hits, f"no {rule} finding on {op}; found {findings}"
    line = planted(tag)
    assert any(at_line(f, line) for f in hits), f"expected line {line}, got {[f.line for f in hits]}"
    assert {(f.piece, f.size) for f in hits} == {("toy", 12)}


def test_numpy_on_a_traced_value_also_stops_the_capture():
    """In the engine's tracing path `.numpy()` raises inside Paddle: the lint reports both the read
    and that the piece could not be captured, and keeps going."""
    findings = lint_one(_numpy)
    assert {f.rule for f in findings} == {"host-read", "capture-failed"}
    assert all(at_line(f, planted("numpy")) for f in findings)


def test_a_program_traced_at_another_size_than_its_buffers_is_a_mismatch():
    """What a fixed-shape program fed buffers of another shape would do (Paddle silently retraces)."""
    fn = piece(_clean)
    program = StaticBackend().program(fn, inputs(8))
    findings = lint_piece(CapturedPiece("toy", 12, program, inputs(12), frozenset([WEIGHT.name])))
    assert [(f.rule, f.detail) for f in findings] == [
        ("buffer-mismatch", f"feed 0 is [8, 4] {paddle.float32}, its buffer [12, 4] {paddle.float32}")]


def test_every_size_is_linted_on_its_own():
    captures = [(f"toy_{s}", s, piece(body), inputs(s)) for s in (4, 16) for body in (_clean, _dropout)]
    found = {(f.piece, f.size) for f in lint_captures(captures, owned=[WEIGHT])}
    assert found == {("toy_4", 4), ("toy_16", 16)}


def test_every_rule_has_a_reason_and_a_document():
    names = [rule.name for rule in RULES]
    assert len(names) == len(set(names))
    for rule in RULES:
        assert rule.why and rule.doc.startswith("https://"), rule.name


# ---- the engine ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", CHECKPOINT_NAMES)
def test_the_engine_pieces_have_no_finding(name):
    """Every piece (prefill) and the whole-model decode graph, at sizes from both ends of the
    ladders and a padded one between."""
    report = lint_model(checkpoint_dir(name), sizes=(4, 24, 64))
    assert report.programs == 3 * (read_model_config(checkpoint_dir(name)).num_layers + 1) + 3
    assert report.findings == []


def test_the_replaying_pieces_have_no_finding():
    """The routing-replay view: its MoE pieces read the recorded ids (one more shared input) and
    route by them; same programs, none with a finding."""
    report = lint_model(checkpoint_dir("glm4_moe"), sizes=(4, 24), replaying=True)
    assert report.programs == 2 * (read_model_config(checkpoint_dir("glm4_moe")).num_layers + 1) + 2
    assert report.findings == []


def test_a_pattern_planted_in_the_replayed_routing_names_the_moe_pieces(monkeypatch):
    """`nonzero` planted in the replayed routing, which only a replaying view's MoE pieces run."""
    original = moe_decoder.replayed_routing

    def with_nonzero(cfg, logits, ids, num_real):
        paddle.nonzero(ids >= 0)  # planted: replay-nonzero
        return original(cfg, logits, ids, num_real)

    monkeypatch.setattr(moe_decoder, "replayed_routing", with_nonzero)
    cfg = read_model_config(checkpoint_dir("glm4_moe"))
    assert lint_model(checkpoint_dir("glm4_moe"), sizes=(8,), phases=("prefill",)).findings == []
    report = lint_model(checkpoint_dir("glm4_moe"), sizes=(8,), phases=("prefill",), replaying=True)
    hits = [f for f in report.findings if f.rule == "data-dependent-shape"]
    assert {f.piece for f in hits} == {f"piece_{layer + 1}" for layer in cfg.moe_layers}
    assert all(at_line(f, planted("replay-nonzero")) for f in hits)


@pytest.mark.parametrize("ep", [1, 4], ids=["tp4", "tp4_ep4"])
def test_the_tensor_parallel_pieces_have_no_finding(ep):
    """Every rank's programs, built in this process (tracing an all-reduce needs no process group)."""
    report = lint_model(checkpoint_dir("glm4_moe"), sizes=(8,), tp=4, ep=ep)
    assert report.ranks == [0, 1, 2, 3] and report.findings == []


def test_a_pattern_planted_in_the_engine_names_the_moe_pieces(monkeypatch):
    """`nonzero` planted in the router's non-finite check, which only MoE pieces run."""
    original = router_module.nonfinite_rows

    def with_nonzero(logits, num_real):
        paddle.nonzero(logits > 0)  # planted: engine-nonzero
        return original(logits, num_real)

    monkeypatch.setattr(router_module, "nonfinite_rows", with_nonzero)
    cfg = read_model_config(checkpoint_dir("glm4_moe"))
    report = lint_model(checkpoint_dir("glm4_moe"), sizes=(8,), phases=("prefill",))
    hits = [f for f in report.findings if f.rule == "data-dependent-shape"]
    moe_pieces = {f"piece_{layer + 1}" for layer in cfg.moe_layers}
    assert {f.piece for f in hits} == moe_pieces
    assert all(at_line(f, planted("engine-nonzero")) and f.size == 8 for f in hits)


# ---- the command line and the backend accessor --------------------------------------------


def test_the_cli_exits_0_when_clean_1_on_findings_2_when_it_cannot_run(monkeypatch, capsys, tmp_path):
    model = str(checkpoint_dir("qwen3_moe"))
    assert main(["--model", model, "--sizes", "8", "--phases", "prefill"]) == 0
    assert "no findings" in capsys.readouterr().out
    assert main(["--model", str(tmp_path), "--sizes", "8"]) == 2
    assert "config.json" in capsys.readouterr().err
    assert main(["--model", model, "--phases", "warmup"]) == 2
    monkeypatch.setattr(router_module, "nonfinite_rows", lambda logits, num_real: paddle.nonzero(logits > 0)[:, 0] > 0)
    assert main(["--model", model, "--sizes", "8", "--phases", "prefill"]) == 1
    assert "data-dependent-shape" in capsys.readouterr().out


def test_the_static_backend_hands_out_the_program_it_replays():
    backend, x = StaticBackend(), inputs(8)
    fn = piece(_clean)
    backend.capture(fn, x)
    program = backend.program(fn, x)
    assert program is backend.program(fn, x)
    assert "pd_op.matmul" in [op.name() for op in program.main_program.global_block().ops]



def test_the_default_sizes_are_the_capture_ladders():
    """Without --sizes the lint takes each phase's capture sizes (the README's own command)."""
    report = lint_model(checkpoint_dir("qwen3_moe"), phases=("decode",))
    assert report.sizes["decode"] == (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64)  # FastDeploy's shape up to 64 seqs
    assert report.findings == []
