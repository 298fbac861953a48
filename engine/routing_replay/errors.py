"""The errors of routing replay. Each names the file (or request) and the reason, so a trainer that
reads a bad file sees which one and why, never a bare EOFError or an unpickling error."""

from __future__ import annotations

from pathlib import Path

from engine.errors import UserError


class RoutingReplayError(UserError, RuntimeError):
    """Base class: something about a routing-replay table or file is wrong (a user error: the CLI
    reports it as one line naming the file or request)."""


class RoutingFileError(RoutingReplayError):
    """A routing file that cannot be trusted. `path` is the file, `reason` says why."""

    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"routing file {self.path}: {reason}")


class RoutingFileMissing(RoutingFileError):
    """No file at the path (or none appeared before a timeout)."""


class RoutingFileCorrupt(RoutingFileError):
    """Truncated, empty or not a routing file at all: the bytes do not parse."""


class RoutingChecksumError(RoutingFileError):
    """The file parses but its ids or metadata are not what was written."""


class RoutingMismatch(RoutingFileError):
    """A sound file that does not fit what the caller expects (model, layers, top_k, prompt, length)."""


class RoutingWriteError(RoutingFileError):
    """Writing the file failed (disk full, permission, ...); no file is left at the path."""


class RoutingRecordError(RoutingReplayError):
    """The recorder was misused or a step's routing broke its contract (e.g. driven inside a capture,
    expert ids in padded rows, a real row left unrecorded)."""
