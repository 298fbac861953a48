"""Graph backends: turn a fixed-shape function plus its static input buffers into a replay.

Both backends give the same contract, the one CUDA graphs impose:
  - the function reads only the input buffers it was captured with; callers copy new data into
    those buffers before each replay;
  - a replay returns the same output tensors every time, overwritten in place, so a reference
    kept across replays sees the later values.

`static` compiles with `paddle.jit.to_static(full_graph=True)` and fixed input specs and copies
each result into owned output buffers (runs on CPU and GPU). `cudagraph` captures with Paddle's
CUDA graph API on a CUDA build, all graphs in one memory pool. `auto` picks `cudagraph` where it
is available and `static` elsewhere. `uncompiled` runs the pieces eagerly on the same padded
buffers: padding and the buffer contract without compilation, so a divergence can be pinned on
one or the other (on this CPU, static programs are bitwise equal to it).
"""

from __future__ import annotations

from typing import Callable, Protocol

import paddle
from paddle.static import InputSpec

Tensors = tuple[paddle.Tensor, ...]
Replay = Callable[[], Tensors]

from engine.config import GRAPH_BACKENDS


class GraphBackendError(ValueError):
    """A backend that cannot run on this build of Paddle."""


class GraphBackend(Protocol):
    name: str

    def capture(self, fn: Callable[..., Tensors], inputs: list[paddle.Tensor]) -> Replay:
        """Capture `fn(*inputs)`; the returned replay reruns it on the current buffer contents."""


class StaticBackend:
    name = "static"

    def __init__(self) -> None:
        # Each compiled program otherwise starts its own executor thread pool: with the fixture's
        # whole ladder captured that is ~1,760 threads, 23 ms per program call instead of 4, and
        # 2.9 GiB of malloc arenas (bench/README.md). Serial runs ops on the calling thread.
        paddle.set_flags({"FLAGS_new_executor_serial_run": True})

    def capture(self, fn: Callable[..., Tensors], inputs: list[paddle.Tensor]) -> Replay:
        specs = [_spec(t) for t in inputs]
        return _into_buffers(paddle.jit.to_static(fn, input_spec=specs, full_graph=True), inputs)


def _spec(value):
    """Fixed-shape input spec of a tensor, or of a list of tensors (the KV cache list)."""
    if isinstance(value, (list, tuple)):
        return [_spec(v) for v in value]
    return InputSpec(list(value.shape), value.dtype)


class UncompiledBackend:
    name = "uncompiled"

    def capture(self, fn: Callable[..., Tensors], inputs: list[paddle.Tensor]) -> Replay:
        return _into_buffers(fn, inputs)


def _into_buffers(fn: Callable[..., Tensors], inputs: list[paddle.Tensor]) -> Replay:
    """Run fn on the input buffers once; later replays copy each result into the same outputs."""
    outputs = tuple(paddle.assign(t) for t in fn(*inputs))  # owned, overwritten by replays

    def replay() -> Tensors:
        for buffer, fresh in zip(outputs, fn(*inputs)):
            paddle.assign(fresh, output=buffer)
        return outputs

    return replay


class CudaGraphBackend:
    """Paddle's CUDA graphs. Written against the documented `paddle.device.cuda.graphs.CUDAGraph`
    API; it cannot run on the CPU-only build this project is tested on."""

    name = "cudagraph"
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

        return replay


def cuda_graphs_available() -> bool:
    from paddle.device.cuda.graphs import is_cuda_graph_supported

    return paddle.is_compiled_with_cuda() and is_cuda_graph_supported()


def make_backend(name: str) -> GraphBackend:
    if name not in GRAPH_BACKENDS:
        raise GraphBackendError(f"graph backend {name!r} is not one of {GRAPH_BACKENDS}")
    if name == "auto":
        name = "cudagraph" if cuda_graphs_available() else "static"
    return {"cudagraph": CudaGraphBackend, "static": StaticBackend, "uncompiled": UncompiledBackend}[name]()
