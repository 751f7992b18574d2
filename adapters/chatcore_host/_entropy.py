"""Random bytes for session ids and resume tokens, drawn from the OS a block at a time.

Drawn one by one (``secrets.token_bytes``), every new session cost two
``getrandom`` system calls, its id's and its resume token's (~3% of a
connect+close cycle's wall-clock samples). :class:`BufferedEntropy` takes 4 KiB
from the same source (``os.urandom``, the OS's cryptographic generator) and
hands it out in slices: one system call per ~120 sessions, and bytes exactly as
strong, since only where they wait changes.

Two rules keep them so. A byte is handed out once: a lock, so that two threads
sharing one buffer never get the same slice. And a forked child never hands out
what its parent buffered (parent and child would then give out the same ids and
tokens): after ``fork`` every buffer in the child is emptied
(``os.register_at_fork``), and its next draw comes from the OS.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable

__all__ = ["BLOCK", "BufferedEntropy"]

BLOCK = 4096
"""Bytes drawn from the OS at a time."""

_buffers: weakref.WeakSet[BufferedEntropy] = weakref.WeakSet()


class BufferedEntropy:
    """``entropy(n)``: ``n`` random bytes, sliced from a block drawn with ``source``."""

    __slots__ = ("__weakref__", "_block", "_buf", "_lock", "_pos", "_source")

    def __init__(self, source: Callable[[int], bytes] = os.urandom, block: int = BLOCK) -> None:
        self._source = source
        self._block = block
        self._buf = b""
        self._pos = 0
        self._lock = threading.Lock()
        _buffers.add(self)

    def __call__(self, n: int) -> bytes:
        with self._lock:
            pos = self._pos
            end = pos + n
            if end > len(self._buf):
                if n > self._block:
                    return self._source(n)
                self._buf = self._source(self._block)
                pos, end = 0, n
            self._pos = end
            return self._buf[pos:end]

    def _forget(self) -> None:
        """In a forked child: drop the parent's bytes (and a lock another thread may have
        held at the fork, which no thread of the child would ever release)."""
        self._buf = b""
        self._pos = 0
        self._lock = threading.Lock()


def _after_fork_in_child() -> None:
    for buffer in list(_buffers):
        buffer._forget()


if hasattr(os, "register_at_fork"):  # (POSIX; elsewhere there is no fork to copy a buffer)
    os.register_at_fork(after_in_child=_after_fork_in_child)
