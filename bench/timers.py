"""Where a step's time goes: timing wrappers installed on one runner, for the benchmark only.

Buckets, summed over the pieces of a step:
  attention  the eager attention between pieces (`MoEDecoder.attention`; shared by both modes)
  replay     `GraphRunner._replay`: copy-in, the compiled piece, the copy into its output buffers
  copy_in    `GraphRunner._copy_in`: real rows into the static input buffers, padded rows zeroed
  program    the compiled piece itself (the callable `paddle.jit.to_static` returned)
The graph path's own cost is then copy_in + (replay - copy_in - program): buffers in, buffers out.

The wrappers reach into engine internals on purpose (private methods, `paddle.jit.to_static`)
and are never installed outside this package.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import paddle

BUCKETS = ("attention", "replay", "copy_in", "program")


class Clock:
    """Accumulates seconds per bucket while `enabled`; costs two perf_counter calls per timed call."""

    def __init__(self) -> None:
        self.enabled = False
        self.seconds: Counter = Counter()

    def wrap(self, bucket: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            if not self.enabled:
                return fn(*args, **kwargs)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[bucket] += time.perf_counter() - start

        return timed

    @contextmanager
    def measuring(self) -> Iterator[Counter]:
        """Time the body from zeroed buckets; yields the counter it fills."""
        self.seconds = Counter()
        self.enabled = True
        try:
            yield self.seconds
        finally:
            self.enabled = False


class _TimedProgram:
    """Stands in for a `to_static` result: same call, timed; other attributes pass through."""

    def __init__(self, program: Callable, clock: Clock) -> None:
        self._program = program
        self._clock = clock
        self._call = clock.wrap("program", program)

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def get_concrete_program(self, *args, **kwargs):
        """The static backend replays the program this returns: time its calls too."""
        concrete, program = self._program.get_concrete_program(*args, **kwargs)
        return concrete, self._clock.wrap("program", program)

    def __getattr__(self, name: str):
        return getattr(self._program, name)


@contextmanager
def timed_programs(clock: Clock) -> Iterator[None]:
    """While open, every `paddle.jit.to_static` result is wrapped so its calls land in `program`.
    Open it around capture: replays later call the wrapped programs."""
    original = paddle.jit.to_static

    def to_static(*args, **kwargs):
        return _TimedProgram(original(*args, **kwargs), clock)

    paddle.jit.to_static = to_static
    try:
        yield
    finally:
        paddle.jit.to_static = original


def instrument(runner, clock: Clock) -> None:
    """Time attention (on the runner's model) and, with graphs, the replay and copy-in of each piece."""
    model = runner.model
    if "attention" not in vars(model):  # the model may be shared by several runners: wrap it once
        model.attention = clock.wrap("attention", model.attention)
    if runner.graphs is not None:
        runner.graphs._replay = clock.wrap("replay", runner.graphs._replay)
        runner.graphs._copy_in = clock.wrap("copy_in", runner.graphs._copy_in)
