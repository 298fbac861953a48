"""Capture-safety lint: would every piece the engine captures also capture as a CUDA graph?

No GPU build of Paddle runs here, so the `cudagraph` backend cannot be exercised. What can be
checked on the CPU is what the `static` backend builds: one fixed-shape Paddle program per piece
and size. This module has the engine trace every piece at every size asked for (through its own
graph runner, so the buffers and chaining are the engine's), watches the trace for host reads, and
walks each program against the rules in `verifier/capture_rules.py`. A finding names the piece, the
size, the rule, the op and the Python line the op (or the read) came from.

Programs are built, not run: tracing needs no process group, so the tensor-parallel ranks' pieces
(all-reduces included) are linted in this one process.

    python -m verifier.capture_lint --model DIR [--sizes 4,8,...] [--phases prefill,decode] [--tp 4 --ep 4]

Exit 0: no finding; 1: findings; 2: could not run (the error names the file or value).
"""

from __future__ import annotations

import argparse
import ast
import inspect
import os
import re
import sys
import textwrap
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, is_dataclass, replace

import paddle

from engine.checkpoint.loader import load_weights
from engine.config import EngineConfig, GraphConfig, ParallelConfig
from engine.distributed import Collectives, Partition
from engine.graph.backends import Replay, StaticBackend
from engine.graph.capture_sizes import capture_sizes_for
from engine.hf_config import read_model_config
from engine.models.moe_decoder import MoEDecoder
from engine.runner import ModelRunner
from verifier.capture_program import (
    CapturedPiece,
    Finding,
    flat_tensors,
    innermost_frame,
    lint_piece,
    source_line,
    tensor_dims,
)
from verifier.capture_rules import BY_NAME

_PADDLE_DIR = os.path.dirname(paddle.__file__) + os.sep
_HOST_READS = ("numpy", "tolist", "item", "__int__", "__float__", "__bool__", "__index__", "__array__",
               "__str__", "__repr__", "__format__")
PHASES = ("prefill", "decode")


# ---- the trace: host reads ---------------------------------------------------------------


@contextmanager
def watch_host_reads(record: Callable[[str, str], None]) -> Iterator[None]:
    """While active, every host read of a traced value or an eager tensor made by code outside
    Paddle calls `record(method, line)`, then proceeds as it would have. The program holds no trace
    of these reads (Paddle drops `.item()` on a traced value, and a read of an eager tensor becomes a
    constant), so they are caught as they happen."""
    patched = []
    for cls in (paddle.pir.Value, paddle.Tensor):
        for name in _HOST_READS:
            original = cls.__dict__.get(name)
            if original is not None:
                setattr(cls, name, _watched(original, f"{cls.__name__}.{name}", record))
                patched.append((cls, name, original))
    try:
        yield
    finally:
        for cls, name, original in patched:
            setattr(cls, name, original)


def _watched(original, label: str, record: Callable[[str, str], None]):
    def watched(self, *args, **kwargs):
        caller = sys._getframe(1)
        if not _internal(caller.f_code.co_filename):
            record(label, source_line(caller.f_code.co_filename, caller.f_lineno, caller.f_code.co_name))
        return original(self, *args, **kwargs)

    return watched


def _internal(filename: str) -> bool:
    return filename.startswith(_PADDLE_DIR) or filename == __file__


@contextmanager
def watch_converted_sources(record: Callable[[str, str], None]) -> Iterator[None]:
    """While active, each function Paddle's AST converter reads the source of (to rewrite it) is
    scanned for `.numpy()` / `.tolist()` calls, and `record(method, line)` is called for each.

    The converter deletes those calls before tracing (`y = x.numpy()` becomes `y = x`), so neither
    the trace nor the program shows them: the source is the only witness. Paddle converts a function
    once per process, so a read is reported at the first size traced. The engine's pieces are traced
    unconverted (`engine/graph/pieces.py`), where `watch_host_reads` sees these calls instead."""
    original = inspect.getsourcelines

    def scanned(obj):
        lines, start = original(obj)
        filename = inspect.getsourcefile(obj) or "?"
        if inspect.isfunction(obj) and not _internal(filename):
            for method, offset in _erased_reads(lines):
                record(f"{method} (erased by the converter)", source_line(filename, start + offset, obj.__name__))
        return lines, start

    inspect.getsourcelines = scanned
    try:
        yield
    finally:
        inspect.getsourcelines = original


def _erased_reads(lines: list[str]) -> Iterator[tuple[str, int]]:
    """(method, 0-based line offset) of each `.numpy()` / `.tolist()` call in a function's source."""
    try:
        tree = ast.parse(textwrap.dedent("".join(lines)))
    except SyntaxError:  # a lambda's line, or source that does not parse alone: nothing to scan
        return
    for node in ast.walk(tree):
        method = node.func.attr if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) else None
        if method in ("numpy", "tolist"):
            yield f".{method}()", node.lineno - 1


# ---- driving the engine's capture ---------------------------------------------------------


class CaptureStopped(RuntimeError):
    """A piece could not be traced; its finding is recorded, later pieces of that size are not linted."""


class Recorder(StaticBackend):
    """A static backend that builds each program without running it and keeps it for the lint,
    with what was seen while tracing it. Replays return zero buffers of the program's output shapes
    (the graph runner only chains them from piece to piece)."""

    def __init__(self, owned: frozenset[str]) -> None:
        super().__init__()
        self.owned = owned  # parameter names the pieces may hold: the model's weights
        self.size, self.count = 0, 0
        self.pieces: list[CapturedPiece] = []
        self.findings: list[Finding] = []

    def start(self, size: int) -> None:
        """The captures that follow build the pieces of one size, in order."""
        self.size, self.count = size, 0

    def capture(self, fn, inputs, name: str | None = None) -> Replay:
        name = name or ("full_decode" if fn.__name__ == "full_decode" else f"piece_{self.count}")
        self.count += 1
        program = self._trace(name, fn, inputs)
        self.pieces.append(CapturedPiece(name, self.size, program, inputs, self.owned, _defined(fn)))
        outputs = tuple(paddle.zeros([max(d, 0) for d in tensor_dims(v)], dtype=v.dtype)
                        for v in flat_tensors(program.outputs))
        return Replay(lambda: outputs, outputs)

    def lint(self) -> list[Finding]:
        return self.findings + [f for piece in self.pieces for f in lint_piece(piece)]

    def _trace(self, name: str, fn, inputs):
        def read(method: str, line: str) -> None:
            finding = Finding(name, self.size, "host-read", method, line)
            if finding not in self.findings:  # the converter reads a function's source twice
                self.findings.append(finding)

        with watch_host_reads(read), watch_converted_sources(read):
            try:
                return self.program(fn, inputs)
            except Exception as err:  # any trace failure is the finding, not a crash of the lint
                self.findings.append(Finding(name, self.size, "capture-failed", type(err).__name__,
                                             _raise_line(err), _error_line(err)))
                raise CaptureStopped(name) from err


def _defined(fn) -> str:
    code = fn.__code__
    return source_line(code.co_filename, code.co_firstlineno, code.co_name)


def _raise_line(err: BaseException) -> str:
    """Where a trace failed: Paddle prints the user's frames into its error message."""
    from_message = innermost_frame(str(err).splitlines(), skip=(_PADDLE_DIR, __file__))
    if from_message != "?":
        return from_message
    tb, frames = err.__traceback__, []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    outside = [f for f in frames if not _internal(f.f_code.co_filename)]
    frame = outside[-1] if outside else None
    return source_line(frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name) if frame else "?"


def _error_line(err: BaseException) -> str:
    """The line of Paddle's error message that names the error ("TypeError: ..."), else its first."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    named = [line for line in lines if re.match(r"\w*(Error|Exception)\b", line)]
    return (named[-1] if named else lines[0] if lines else type(err).__name__)[:200]


def lint_captures(captures: Iterable[tuple[str, int, Callable, list]], owned: Iterable[paddle.Tensor] = ()
                  ) -> list[Finding]:
    """Lint functions captured directly (toy pieces): each `(name, size, fn, inputs)` is traced the
    way the static backend traces a piece; `owned` are the tensors the pieces may hold as weights."""
    recorder = Recorder(frozenset(t.name for t in owned))
    for name, size, fn, inputs in captures:
        recorder.start(size)
        try:
            recorder.capture(fn, inputs, name)
        except CaptureStopped:
            continue
    return recorder.lint()


@dataclass
class LintReport:
    model: str
    ranks: list[int]
    sizes: dict[str, tuple[int, ...]]  # phase -> sizes linted
    programs: int = 0
    findings: list[Finding] = field(default_factory=list)


def lint_model(model_dir: str, sizes: tuple[int, ...] | None = None, phases: tuple[str, ...] = PHASES,
               tp: int = 1, ep: int = 1, ranks: tuple[int, ...] | None = None,
               replaying: bool = False) -> LintReport:
    """Trace every piece of the checkpoint in `model_dir` at `sizes` (default: each phase's capture
    sizes) for each phase, as rank r of a tp-way job for every r in `ranks` (default: all), and
    lint each program. Prefill builds the pieces; decode builds the whole-model decode graph.
    With `replaying`, the pieces of the decoder's routing-replay view (MoE layers routed by ids)."""
    engine = EngineConfig(graph=GraphConfig(mode="full_and_piecewise", backend="static"),
                          parallel=ParallelConfig(tp=tp, ep=ep))
    cfg = read_model_config(model_dir)
    ladder = {phase: sizes or capture_sizes_for(engine)[phase].sizes for phase in phases}
    report = LintReport(str(model_dir), list(ranks if ranks is not None else range(tp)), ladder)
    for rank in report.ranks:
        runner, owned = _rank_runner(model_dir, cfg, engine, rank, replaying)
        recorder = Recorder(owned)
        runner.backend = recorder
        for phase, phase_sizes in ladder.items():
            for size in sorted(phase_sizes, reverse=True):
                recorder.start(size)
                try:
                    runner.capture(phase, size)
                except CaptureStopped:
                    pass
        label = f"rank {rank}: " if tp > 1 else ""
        report.programs += len(recorder.pieces)
        report.findings += [replace(f, piece=label + f.piece) for f in recorder.lint()]
    return report


def _rank_runner(model_dir: str, cfg, engine, rank: int, replaying: bool = False):
    """The engine's graph runner for `rank` (weights sliced as that rank reads them, no process
    group joined) and the names of the model's weights."""
    par = engine.parallel
    partition = Partition(rank, par.tp, expert_parallel=par.ep > 1)
    weights = load_weights(model_dir, cfg, lambda name: partition.tensor_slice(cfg, name))
    model = MoEDecoder(cfg, weights, partition=partition, comm=Collectives(par.tp),
                       fused_allreduce_max_tokens=par.fused_allreduce_max_tokens)
    view = model.with_replayed_routing() if replaying else model
    return ModelRunner(view, engine).graphs, frozenset(t.name for t in _tensors(vars(model)))


def _tensors(value) -> Iterator[paddle.Tensor]:
    """Every tensor reachable from `value` through dicts, lists, tuples and dataclasses."""
    if isinstance(value, paddle.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif is_dataclass(value) and not isinstance(value, type):
        yield from _tensors(vars(value))


# ---- command line -------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory (config.json + safetensors)")
    parser.add_argument("--sizes", type=_int_list, help="comma-separated padded sizes (default: the capture ladders)")
    parser.add_argument("--phases", type=lambda s: tuple(s.split(",")), default=PHASES,
                        help="prefill (the pieces) and/or decode (the whole-model decode graph)")
    parser.add_argument("--tp", type=int, default=1, help="lint the pieces of every rank of a tp-way job")
    parser.add_argument("--ep", type=int, default=1, help="1, or tp to place experts on ranks")
    parser.add_argument("--replaying", action="store_true",
                        help="lint the routing-replay pieces (MoE layers routed by recorded ids)")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated positive integers")
    return sizes


def run(args: argparse.Namespace) -> int:
    bad = [p for p in args.phases if p not in PHASES]
    if bad:
        print(f"error: --phases {','.join(bad)}: each phase is one of {', '.join(PHASES)}", file=sys.stderr)
        return 2
    try:
        report = lint_model(args.model, args.sizes, args.phases, args.tp, args.ep,
                            replaying=args.replaying)
    except (ValueError, OSError, KeyError) as err:  # config, checkpoint and size errors name their file/value
        print(f"error: {err}", file=sys.stderr)
        return 2
    render(report)
    return 1 if report.findings else 0


def render(report: LintReport) -> None:
    """A rich table of the findings, one row per (piece, rule, op, line) with the sizes it occurs at."""
    from rich.console import Console
    from rich.table import Table

    rows: dict[tuple, list[int]] = {}
    for f in report.findings:
        rows.setdefault((f.piece, f.rule, f.op, f.line, f.detail), []).append(f.size)
    console = Console(width=None if sys.stdout.isatty() else 160)  # CI logs: rows on one line each
    sizes = ", ".join(f"{phase} {len(s)} sizes" for phase, s in report.sizes.items())
    console.print(f"capture lint: {report.model}, ranks {report.ranks}, {sizes}, {report.programs} programs")
    if not rows:
        console.print("[green]no findings[/green]: every program would capture")
        return
    table = Table("piece", "sizes", "rule", "op", "line", "detail")
    for (piece, rule, op, line, detail), at in rows.items():
        table.add_row(piece, _span(sorted(set(at))), rule, op, line, detail)
    console.print(table)
    for rule in sorted({f.rule for f in report.findings}):
        console.print(f"[bold]{rule}[/bold]: {BY_NAME[rule].why} ({BY_NAME[rule].doc})")


def _span(sizes: list[int]) -> str:
    return ",".join(map(str, sizes)) if len(sizes) <= 4 else f"{sizes[0]}..{sizes[-1]} ({len(sizes)})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m verifier.capture_lint", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
