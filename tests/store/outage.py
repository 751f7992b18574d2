"""Making a SQLite file unwritable while a store (or a server) has it open."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def _can_freeze() -> str | None:
    if os.geteuid() != 0 or shutil.which("chattr") is None:
        return "making an open file unwritable needs chattr +i as root"
    return None


@contextmanager
def unwritable(db: Path) -> Iterator[None]:
    """The database file and its WAL refuse every write, even through open handles,
    until the block ends (chattr +i: root ignores chmod)."""
    why = _can_freeze()
    if why is not None:
        pytest.skip(why)
    files = [str(p) for p in (db, Path(f"{db}-wal")) if p.exists()]
    subprocess.run(["chattr", "+i", *files], check=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *files], check=True)
