"""Graph backends: turn a fixed-shape function plus its static input buffers into a replay.

Both backends give the same contract, the one CUDA graphs impose:
  - the function reads only the input buffers it was captured with; callers copy new data into
    those buffers before each replay;
  - a replay returns the same output tensors every time, overwritten in place, so a reference
    kept across replays sees the later values.

`static` compiles with `paddle.jit.to_static(full_graph=True)`, one fixed-shape program per
function and input shapes, and copies each result into owned output buffers (runs on CPU and GPU). `cudagraph` captures with Paddle's
CUDA graph API on a CUDA build, all graphs in one memory pool. `auto` picks `cudagraph` where it
is available and `static` elsewhere. `uncompiled` runs the pieces eagerly on the same padded
buffers: padding and the buffer contract without compilation, so a divergence can be pinned on
one or the other (on this CPU, static programs are bitwise equal to it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import paddle

from engine.config import GraphBackend as BackendKind
from engine.graph import paddle_compat
from engine.errors import UserError

Tensors = tuple[paddle.Tensor, ...]


@dataclass(frozen=True)
class Replay:
    """A captured function. Calling it reruns the capture on the current contents of its input
    buffers and returns `outputs`: the same tensors every time, overwritten in place. A caller may
    hand `outputs` to another capture as its input buffers (the graph runner chains pieces so)."""

    run: Callable[[], Tensors]
    outputs: Tensors

    def __call__(self) -> Tensors:
        return self.run()


class GraphBackendError(UserError, ValueError):
    """A backend that cannot run on this build of Paddle."""


class GraphBackend(Protocol):
    name: str

    def capture(self, fn: Callable[..., Tensors], inputs: list[paddle.Tensor]) -> Replay:
        """Capture `fn(*inputs)`; the returned replay reruns it on the current buffer contents."""


class StaticBackend:
    name = BackendKind.STATIC

    def __init__(self) -> None:
        paddle_compat.set_process_flags()  # serial executor, no GC threads: why in paddle_compat
        self._compiled: dict[Callable[..., Tensors], Callable[..., Tensors]] = {}

    def capture(self, fn: Callable[..., Tensors], inputs: list[paddle.Tensor]) -> Replay:
        """Build (and run once) the program of `fn` at the shapes of `inputs`.

        One `to_static` per function, reused for every size: without an input spec it keys its
        program cache on the shapes and dtypes of the actual inputs, so each size still gets its
        own fixed-shape program, but the function is converted only once. Replays call that
        program directly, skipping the per-call input-spec hashing of the to_static wrapper."""
        compiled = self._converted(fn)
        with paddle_compat.short_op_callstacks():
            first = compiled(*inputs)
        program = paddle_compat.concrete_program(compiled, inputs)  # the one just built
        args = tuple(inputs)
        return _into_buffers(lambda: program(args), first)

    def program(self, fn: Callable[..., Tensors], inputs: list[paddle.Tensor]):
        """The program `capture(fn, inputs)` replays, as Paddle's ConcreteProgram (`main_program`,
        `inputs`, `outputs`, `parameters`); traced now, without running, if it was not built yet.
        For inspection only (verifier/capture_lint.py)."""
        with paddle_compat.short_op_callstacks():
            return paddle_compat.traced_program(self._converted(fn), inputs)

    def _converted(self, fn: Callable[..., Tensors]):
        compiled = self._compiled.get(fn)
        if compiled is None:
            compiled = self._compiled[fn] = paddle.jit.to_static(fn, full_graph=True)
            compiled.eval()  # inference programs: no backward program is built
        return compiled


class UncompiledBackend:
    name = BackendKind.UNCOMPILED

    def capture(self, fn: Callable[..., Tensors], inputs: list[paddle.Tensor]) -> Replay:
        return _into_buffers(lambda: fn(*inputs), fn(*inputs))


def _into_buffers(run: Callable[[], Tensors], first: Tensors) -> Replay:
    """Owned copies of the first run's results; each replay reruns and copies into the same tensors.

    `Tensor.copy_` writes into the buffer's own memory when the shapes match (it would silently
    reshape the buffer otherwise: they always match here, a program's output shapes are fixed), and
    costs a few microseconds where `paddle.assign(..., output=)` costs 8-25."""
    outputs = tuple(paddle.assign(t) for t in first)  # owned, overwritten by replays

    def replay() -> Tensors:
        for buffer, fresh in zip(outputs, run()):
            buffer.copy_(fresh, True)
        return outputs

    return Replay(replay, outputs)


class CudaGraphBackend:
    """Paddle's CUDA graphs. Written against the documented `paddle.device.cuda.graphs.CUDAGraph`
    API; it cannot run on the CPU-only build this project is tested on."""

    name = BackendKind.CUDAGRAPH
    POOL_ID = 1  # every graph of a runner allocates from this one pool, as vLLM/SGLang share theirs

    def __init__(self) -> None:
        if not cuda_graphs_available():
            raise GraphBackendError("graph backend 'cudagraph' needs a CUDA build of Paddle; this build has "
                                    "no CUDA graph support (use backend 'static' or 'auto')")
        from paddle.device.cuda.graphs import CUDAGraph

        self._graph_type = CUDAGraph

    def capture(self, fn: Callable[..., Tensors], inputs: list[paddle.Tensor]) -> Replay:
        fn(*inputs)  # warm-up outside capture: lazy initialisations must not be recorded
        graph = self._graph_type(pool_id=self.POOL_ID)
        graph.capture_begin()
        try:
            outputs = tuple(fn(*inputs))
        finally:
            graph.capture_end()

        def replay() -> Tensors:
            graph.replay()
            return outputs

        return Replay(replay, outputs)


def cuda_graphs_available() -> bool:
    from paddle.device.cuda.graphs import is_cuda_graph_supported

    return paddle.is_compiled_with_cuda() and is_cuda_graph_supported()


def make_backend(kind: BackendKind | str) -> GraphBackend:
    """The backend of that kind; `auto` is cudagraph on a CUDA build with graph support, else static."""
    try:
        kind = BackendKind(kind)
    except ValueError:
        raise GraphBackendError(f"graph backend {kind!r} is not one of {[k.value for k in BackendKind]}") from None
    if kind is BackendKind.AUTO:
        kind = BackendKind.CUDAGRAPH if cuda_graphs_available() else BackendKind.STATIC
    return {BackendKind.CUDAGRAPH: CudaGraphBackend, BackendKind.STATIC: StaticBackend,
            BackendKind.UNCOMPILED: UncompiledBackend}[kind]()
