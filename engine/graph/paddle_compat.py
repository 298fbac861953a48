"""Every use of Paddle internals, and the process-wide Paddle flags: the one module to revisit when
Paddle changes.

Written against PaddlePaddle `WRITTEN_FOR` (3.3.1). Importing this module under another version
warns once, naming both versions: the internals below are not public API and may have moved.

  convert_load          dy2static's own hook that turns a tensor read inside a to_static trace
                        into a program parameter (public `to_static` does this for the code it
                        converts; the engine traces the pieces unconverted and calls it itself)
  concrete_program      the fixed-shape program a to_static function just built, called directly
                        on replay (skips the wrapper's per-call input-spec hashing)
  short_op_callstacks   a scoped patch of `traceback.extract_stack` while a program is built
  set_process_flags     `FLAGS_new_executor_serial_run` and `FLAGS_eager_delete_tensor_gb`,
                        set once per process, never restored (they steer every program after)
  set_kernel_threads    the CPU kernels' OpenMP/MKL thread count (Paddle has no public setter);
                        engine/threads.py decides the number
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import paddle
from paddle.jit.dy2static.convert_operators import convert_load

WRITTEN_FOR = "3.3.1"
_PADDLE_DIR = os.path.dirname(paddle.__file__) + os.sep  # frames under it are Paddle's own

# Why each flag (measured on the fixture's whole 58-size ladder; bench/README.md):
#   FLAGS_new_executor_serial_run  each compiled program otherwise starts its own executor thread
#       pool: ~1,760 threads, 23 ms per program call instead of 4, 2.9 GiB of malloc arenas. Serial
#       runs ops on the calling thread, in the order eager runs them.
#   FLAGS_eager_delete_tensor_gb=-1  a CPU program's garbage collector hands every freed temporary
#       to a worker thread, at a cost growing with the number of programs in the process (a
#       16-token step's pieces took 2.5x longer with the ladder captured); off, resident memory
#       after capture stayed the same (+963 vs +964 MiB).
PROCESS_FLAGS = {"FLAGS_new_executor_serial_run": True, "FLAGS_eager_delete_tensor_gb": -1.0}

__all__ = ["WRITTEN_FOR", "PROCESS_FLAGS", "check_version", "concrete_program", "convert_load",
           "set_kernel_threads", "set_process_flags", "short_op_callstacks"]


def set_kernel_threads(count: int) -> None:
    """Make Paddle's CPU kernels use `count` threads (OpenMP and MKL), process-wide."""
    from paddle.base import core

    core.set_num_threads(count)


def check_version(version: str = paddle.__version__) -> str | None:
    """A warning (also returned) when `version` is not the one this module was written against."""
    if version == WRITTEN_FOR:
        return None
    message = (f"engine/graph/paddle_compat.py was written against PaddlePaddle {WRITTEN_FOR}, this is "
               f"{version}: the dy2static internals it uses (convert_load, concrete programs, op call "
               f"stacks) may have changed; run cases/test_pieces.py and cases/test_graph_toy.py")
    warnings.warn(message, RuntimeWarning, stacklevel=2)
    return message


def set_process_flags() -> None:
    """Set `PROCESS_FLAGS` (idempotent). Called by the static backend, the only code they serve."""
    paddle.set_flags(PROCESS_FLAGS)


def concrete_program(compiled, inputs: list) -> Callable[[tuple], tuple]:
    """The program `compiled` (a to_static function, eval mode) built for `inputs`' shapes; call it
    with `tuple(inputs)` to rerun it on the inputs' current contents."""
    _, program = compiled.get_concrete_program(*inputs, is_train=False)
    return program


def traced_program(compiled, inputs: list):
    """Paddle's ConcreteProgram for `inputs`' shapes (`main_program`, `inputs`, `outputs`,
    `parameters`), traced now without running if it was not built yet; for inspection only."""
    return compiled.get_concrete_program(*inputs, is_train=False)[0]


@contextmanager
def short_op_callstacks(depth: int = 2) -> Iterator[None]:
    """Record each op's creating Python stack as the `depth` frames that called into Paddle, lines unread.

    While a program is built, Paddle stores with every op the Python stack that created it (shown in
    its error messages), calling `traceback.extract_stack` for each op. Under pytest that is 40+ frames,
    each with a source-line lookup and a stat of its file: a third of capture time. Paddle's own frames
    are skipped (walking them is cheap, recording them is not), so the frames kept are the ones worth
    reading: the engine line that made the op and its caller. Lines are read only if asked for.
    """
    original = traceback.extract_stack

    def from_caller(f=None, limit=None):
        frame = f if f is not None else sys._getframe(1)
        while frame is not None and frame.f_code.co_filename.startswith(_PADDLE_DIR):
            frame = frame.f_back
        frames = []
        while frame is not None and len(frames) < (limit or depth):
            code = frame.f_code
            frames.append(traceback.FrameSummary(code.co_filename, frame.f_lineno, code.co_name, lookup_line=False))
            frame = frame.f_back
        return traceback.StackSummary.from_list(frames[::-1])

    traceback.extract_stack = from_caller
    try:
        yield
    finally:
        traceback.extract_stack = original


check_version()
