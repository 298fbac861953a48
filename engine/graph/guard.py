"""The capture guard: which phase and size the current forward runs in, and whether it captures.

It is a scoped value owned by one runner and carried in `ForwardContext`, never a process-wide
flag: entering restores the previous state on exit and on exceptions, and scopes nest. Code with
side effects asks the guard (or better, writes into static buffers in-graph and lets the host
persist after the step), so it behaves the same whether a step was captured, replayed or eager.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

EAGER = "eager"
PREFILL = "prefill"  # prefill and mixed prefill/decode steps
DECODE = "decode"  # steps made only of decodes


@dataclass(frozen=True)
class CaptureState:
    phase: str = EAGER
    size: int | None = None  # the padded size; None when eager
    capturing: bool = False


class CaptureGuard:
    """A stack of `CaptureState`s; the top is the current one."""

    def __init__(self) -> None:
        self._stack = [CaptureState()]

    @property
    def state(self) -> CaptureState:
        return self._stack[-1]

    @property
    def capturing(self) -> bool:
        return self.state.capturing

    @contextmanager
    def scope(self, phase: str, size: int | None, capturing: bool = False) -> Iterator[CaptureState]:
        """Run the body in this state; the previous one comes back however the body ends."""
        depth = len(self._stack)
        self._stack.append(CaptureState(phase, size, capturing))
        try:
            yield self._stack[-1]
        finally:
            del self._stack[depth:]
