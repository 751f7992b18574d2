"""The record file: the lines of a :class:`chatcore.Recorder`, on disk, bounded.

:class:`RecordFile` appends lines to ``PATH``; past ``max_bytes`` it rotates
(``PATH`` becomes ``PATH.1``, ``PATH.1`` becomes ``PATH.2``... up to
``PATH.KEEP``, the oldest removed). :func:`read_record` gives the lines back
oldest first across the parts still there. A replay needs the record's
first line (its header): once rotation has removed the oldest part, the
record can no longer be replayed, and :func:`chatcore.replay` says so. Pick
``max_bytes * (keep + 1)`` larger than the run you want to keep.

A record holds every message's text, user names and resume tokens: keep it
as private as the history (the file is created readable by its owner only).
It never holds a call's SDP or ICE candidates (the recorder writes a filler).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

__all__ = ["RecordFile", "read_record"]


class RecordFile:
    """Append-only, size-bounded, rotated record of an engine's run."""

    def __init__(
        self, path: str | os.PathLike[str], *, max_bytes: int = 64 << 20, keep: int = 3
    ) -> None:
        if max_bytes <= 0 or keep < 0:
            raise ValueError("max_bytes must be positive and keep at least 0")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.keep = keep
        self._file: TextIO | None = None
        self._size = 0
        self._open(fresh=True)

    def _open(self, *, fresh: bool) -> TextIO:
        if fresh:
            # A new run: the parts of an earlier one would not replay with it.
            for part in [self.path, *(self._part(i) for i in range(1, self.keep + 1))]:
                part.unlink(missing_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._file = file = os.fdopen(fd, "w", encoding="utf-8", errors="surrogatepass")
        self._size = 0
        return file

    def _part(self, i: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{i}")

    def write(self, line: str) -> None:
        """Append one line (without its newline); rotate first if it would overflow."""
        if self._file is None:
            return  # closed: the server is stopping, the rest is not recorded
        file = self._file
        n = len(line.encode("utf-8", "surrogatepass")) + 1
        if self._size and self._size + n > self.max_bytes:
            file = self._rotate(file)
        file.write(line)
        file.write("\n")
        self._size += n

    def _rotate(self, file: TextIO) -> TextIO:
        file.close()
        if self.keep == 0:
            self.path.unlink(missing_ok=True)
        else:
            self._part(self.keep).unlink(missing_ok=True)
            for i in range(self.keep - 1, 0, -1):
                if self._part(i).exists():
                    self._part(i).rename(self._part(i + 1))
            self.path.rename(self._part(1))
        return self._open(fresh=False)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_record(path: str | os.PathLike[str]) -> Iterator[str]:
    """Every line of the record at ``path``, oldest part first."""
    base = Path(path)
    parts: list[Path] = []
    i = 1
    while (part := base.with_name(f"{base.name}.{i}")).exists():
        parts.append(part)
        i += 1
    for part in [*reversed(parts), base]:
        if part.exists():
            with part.open(encoding="utf-8", errors="surrogatepass") as f:
                for line in f:
                    yield line.rstrip("\n")
