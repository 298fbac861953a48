"""RoutingStore: writes each finished request's table to `<dir>/<request name>.safetensors`, atomically.

A write goes to a temporary file in the same folder, which is flushed and fsynced, renamed over the
final name, and then the folder is fsynced, so a reader (or a crash) sees either no file or a whole
one. Files get the permissions the umask gives (0666 & ~umask), not mkstemp's 0600: the trainer
that reads them is often another user. With `background=True` writes run on one worker thread;
`close()` waits for every pending write. A failed write is a RoutingWriteError naming the file,
raised from `save` (or, in the background, from the next `save` or `close`), never swallowed.

Only the store whose `writes` is true touches the folder: under tensor or expert parallelism every
rank records the same ids (checked per step by the recorder) and rank 0 alone writes.
"""

from __future__ import annotations

import os
import queue
import re
import threading
import uuid
from pathlib import Path

from engine.failpoints import NO_FAULTS, Failpoints
from engine.routing_replay.errors import RoutingWriteError
from engine.routing_replay.table_file import EXTENSION, RoutingTable, encode

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_CHUNK = 1 << 16  # the planted in-place writer writes in chunks, as a streaming writer would


def file_name(request: str) -> str:
    """The file name for a request; names that could escape the folder or hide a file are refused."""
    if not _NAME.fullmatch(request):
        raise RoutingWriteError(request, "request name must be 1-200 of [A-Za-z0-9._-], not starting with "
                                         "'.' or '-', to name a routing file")
    return request + EXTENSION


class RoutingStore:
    def __init__(self, directory: str | Path, writes: bool = True, background: bool = False,
                 faults: Failpoints = NO_FAULTS):
        self.directory = Path(directory)
        self.writes = writes or faults.on("r3.every_rank_writes")
        self.faults = faults
        self.written: list[Path] = []  # final paths, in the order their writes completed
        self._names: set[str] = set()
        self._errors: list[RoutingWriteError] = []
        self._queue: queue.Queue | None = None
        self._worker: threading.Thread | None = None
        if self.writes:
            self.directory.mkdir(parents=True, exist_ok=True)
        if self.writes and background:
            self._queue = queue.Queue()
            self._worker = threading.Thread(target=self._drain, name="routing-store", daemon=True)
            self._worker.start()

    def path_for(self, request: str) -> Path:
        return self.directory / file_name(request)

    def save(self, table: RoutingTable) -> Path:
        """Write (or queue) `table` under its request name; returns the final path. Each name is
        written once per store: two requests with one name would overwrite each other."""
        path = self.path_for(table.request)
        if table.request in self._names:
            raise RoutingWriteError(path, f"request name {table.request!r} was already written by this run")
        self._names.add(table.request)
        self._raise_failed()
        if not self.writes:
            return path
        if self._queue is not None:
            self._queue.put((path, table))
        else:
            self._write(path, table)
        return path

    def close(self) -> None:
        """Wait for every pending write; raise the first failure."""
        if self._queue is not None:
            self._queue.put(None)
            self._worker.join()
            self._queue = None
        self._raise_failed()

    def _raise_failed(self) -> None:
        if self._errors:
            raise self._errors[0]

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                self._write(*item)
            except RoutingWriteError as err:
                self._errors.append(err)

    def _write(self, path: Path, table: RoutingTable) -> None:
        write = write_in_place if self.faults.on("r3.write_in_place") else write_atomic
        try:
            write(path, encode(table))
        except (OSError, ValueError) as err:  # ValueError: a table the format cannot encode
            raise RoutingWriteError(path, f"write failed: {err}") from err
        self.written.append(path)


def write_atomic(path: Path, data: bytes) -> None:
    """Temp file in the same folder, write, flush, fsync, rename over `path`, fsync the folder.
    On any failure the temporary file is removed and `path` is untouched."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0666 & ~umask, unlike mkstemp
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_in_place(path: Path, data: bytes) -> None:
    """The planted bug (failpoint r3.write_in_place): the final path is truncated and filled in
    place, so a crash or a reader in the middle sees a partial file."""
    with open(path, "wb") as f:
        for start in range(0, len(data), _CHUNK):
            f.write(data[start:start + _CHUNK])
            f.flush()
            os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
