"""What a captured piece's Paddle program may not hold, if it is to capture as a CUDA graph.

`lint_piece` walks one program (a piece at one size, as the static backend built it) against the
rules in `verifier/capture_rules.py`: op-name rules, unknown dimensions from fixed-shape inputs,
in-place writes into buffers or weights, parameters that are not the model's weights, feeds that
do not match the input buffers, and results that leave other than through the outputs.
`verifier/capture_lint.py` drives the engine's capture and the trace-time checks.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

from verifier.capture_rules import ALLOWED_COLLECTIVES, BY_NAME, op_rule


@dataclass(frozen=True)
class Finding:
    piece: str  # "piece_3" (captured between attention ops) or "full_decode"
    size: int  # padded token count of the program
    rule: str  # a name in verifier/capture_rules.py
    op: str  # the Paddle op, or the host-read method, that breaks the rule
    line: str  # "path:line in function" of the Python that made it, "?" when Paddle recorded none
    detail: str = ""

    @property
    def why(self) -> str:
        return BY_NAME[self.rule].why


@dataclass(frozen=True)
class CapturedPiece:
    """One piece at one size as the static backend would replay it: its program, the input buffers
    it was traced with, and the parameter names it may hold (the model's weights)."""

    name: str
    size: int
    program: object  # Paddle's ConcreteProgram: main_program, inputs, outputs
    inputs: list
    owned: frozenset[str]
    where: str = "?"  # the captured function's definition: the line for faults no op records


def lint_piece(piece: CapturedPiece) -> list[Finding]:
    """Every rule broken by the program of `piece`, one finding per op (and per structural fault)."""
    program = piece.program
    ops = list(_walk(program.main_program.global_block()))
    found = [f for op in ops for f in _op_findings(piece, op)]
    found += _parameter_findings(piece, ops)
    found += _feed_findings(piece, list(flat_tensors(program.inputs)))
    found += _escape_findings(piece, ops, list(flat_tensors(program.inputs)), list(flat_tensors(program.outputs)))
    return found


def _walk(block) -> Iterator:
    for op in block.ops:
        yield op
        for inner in op.blocks():  # the bodies of if / while ops
            yield from _walk(inner)


def _finding(piece: CapturedPiece, rule: str, op, detail: str = "", line: str | None = None) -> Finding:
    return Finding(piece.name, piece.size, rule, op.name(), line or op_line(op), detail)


def op_line(op) -> str:
    """The innermost Python frame Paddle recorded for `op` ("path:line in function"), or "?"."""
    return innermost_frame(op.attrs().get("op_callstack") or [])


def innermost_frame(entries: list[str], skip: tuple[str, ...] = ()) -> str:
    """The last `File "path", line N, in function` entry of a printed stack whose path does not
    start with one of `skip`, as "path:line in function"; "?" when there is none."""
    for entry in reversed(entries):
        entry = entry.strip()
        if entry.startswith('File "') and '", line ' in entry and not entry[len('File "'):].startswith(skip):
            path, rest = entry[len('File "'):].split('", line ', 1)
            line, _, function = rest.partition(", in ")
            return source_line(path, line, function)
    return "?"


def _op_findings(piece: CapturedPiece, op) -> list[Finding]:
    name = op.name()
    rule = op_rule(name)
    if rule is not None and not (rule.name == "unseeded-random" and _seeded(op)):
        return [_finding(piece, rule.name, op)]
    found = []
    if rule is None and _makes_unknown_dims(op):
        found.append(_finding(piece, "dynamic-shape", op, f"result shapes {[tensor_dims(r) for r in op.results()]}"))
    target = _inplace_target(op)
    if target is not None:
        source = target.get_defining_op().name()
        if source in ("pd_op.data", "builtin.parameter"):
            what = "an input buffer" if source == "pd_op.data" else "a weight"
            found.append(_finding(piece, "foreign-inplace", op, f"writes into {what}"))
    return found


def _seeded(op) -> bool:
    attrs = op.attrs()
    return bool(attrs.get("fix_seed")) or bool(attrs.get("seed"))


def tensor_dims(value) -> list[int]:
    """The shape of a traced value (-1 where unknown), [] for an absent optional result."""
    try:
        return list(value.shape)
    except (ValueError, RuntimeError, TypeError):  # an absent optional result has no type
        return []


def _makes_unknown_dims(op) -> bool:
    if op.name() == "builtin.combine" or op.name().startswith("pd_op.data"):
        return False
    made = any(-1 in tensor_dims(r) for r in op.results())
    return made and not any(-1 in tensor_dims(v) for v in op.operands_source())


def _inplace_target(op):
    """The operand an in-place op (name ending in "_") writes into, or None."""
    name = op.name()
    if not name.endswith("_") or op.num_operands() == 0:
        return None
    if ALLOWED_COLLECTIVES.fullmatch(name) is None and op_rule(name) is not None:
        return None  # already reported by its own rule
    names = op.get_input_names()
    index = next((names.index(n) for n in ("output", "out") if n in names), 0)
    return op.operand_source(index)


def _parameter_findings(piece: CapturedPiece, ops: list) -> list[Finding]:
    found = []
    for op in ops:
        if op.name() != "builtin.parameter":
            continue
        name = op.attrs()["parameter_name"]
        if name not in piece.owned:
            users = op.result(0).all_used_ops()
            line = op_line(users[0]) if users else None
            found.append(_finding(piece, "closed-over-tensor", op, f"parameter {name!r} "
                                  f"{list(op.result(0).shape)}", line))
    return found


def _feed_findings(piece: CapturedPiece, feeds: list) -> list[Finding]:
    buffers = list(flat_tensors(piece.inputs))
    if len(feeds) != len(buffers):
        return [Finding(piece.name, piece.size, "buffer-mismatch", "pd_op.data", piece.where,
                        f"{len(feeds)} feeds for {len(buffers)} input buffers")]
    found = []
    for i, (feed, buffer) in enumerate(zip(feeds, buffers)):
        if tensor_dims(feed) != list(buffer.shape) or feed.dtype != buffer.dtype:
            found.append(Finding(piece.name, piece.size, "buffer-mismatch", "pd_op.data", piece.where,
                                 f"feed {i} is {tensor_dims(feed)} {feed.dtype}, its buffer {list(buffer.shape)} "
                                 f"{buffer.dtype}"))
    return found


def flat_tensors(items) -> Iterator:
    """The tensors of nested lists and tuples, in order (the full decode graph takes a cache list)."""
    for item in items:
        if isinstance(item, (list, tuple)):
            yield from flat_tensors(item)
        else:
            yield item


_SIDE_EFFECTS = ("builtin.shadow_output", "builtin.parameter", "pd_op.data", "pd_op.print")


def _escape_findings(piece: CapturedPiece, ops: list, feeds: list, outputs: list) -> list[Finding]:
    found, returned = [], {v.id for v in outputs}  # (a Value's == builds an op: compare ids)
    feed_ids = [v.id for v in feeds]
    for i, value in enumerate(outputs):
        source = value.get_defining_op()
        if source.name() in ("pd_op.data", "builtin.parameter"):
            what = f"input {feed_ids.index(value.id)}" if value.id in feed_ids else "a weight"
            found.append(_finding(piece, "escaped-output", source, f"output {i} is {what} passed through, so "
                                  "it aliases a buffer the caller refills", piece.where))
    for op in ops:
        dead = op.num_results() > 0 and all(r.use_empty() and r.id not in returned for r in op.results())
        if dead and op.name() not in _SIDE_EFFECTS and not op.name().endswith("_"):
            found.append(_finding(piece, "escaped-output", op, "computed, never used and not returned"))
    return found


def source_line(filename: str, line: int | str, function: str) -> str:
    """"path:line in function", the path relative to the working directory when it lies below it."""
    path = os.path.relpath(filename) if filename.startswith(os.getcwd()) else filename
    return f"{path}:{line} in {function}"
