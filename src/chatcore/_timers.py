"""The engine's timers: one heap of absolute deadlines, invalidated lazily.

An entry is never removed when what it guards changes (a pong arrives, a
session resumes); instead each entry says what it was armed for, and the
engine checks that this still holds when the entry comes due. That keeps the
hot paths free of heap work.
"""

from __future__ import annotations

import heapq
from typing import NamedTuple

from ._room import Room
from ._session import Connection, Session

__all__ = ["GraceOver", "HeadProbe", "PingDue", "PongDue", "Timer", "Timers", "TypingOver"]


class PingDue(NamedTuple):
    """Time to ping ``conn``."""

    conn: Connection


class PongDue(NamedTuple):
    """``conn`` was pinged at ``sent``: it must have been heard from since."""

    conn: Connection
    sent: float


class GraceOver(NamedTuple):
    """The grace period of ``session``'s detachment number ``gen`` is over."""

    session: Session
    gen: int


class TypingOver(NamedTuple):
    """The typing indicator ``id`` of ``user`` in ``room`` may have expired."""

    room: Room
    user: str
    id: int


class HeadProbe(NamedTuple):
    """Time to ask the log for the heads of idle held rooms (``_cluster``);
    ``gen`` is the probe's arming, stale once re-armed or disarmed."""

    gen: int


Timer = PingDue | PongDue | GraceOver | TypingOver | HeadProbe

Entry = tuple[float, int, Timer]


class Timers:
    __slots__ = ("_heap", "_seq")

    def __init__(self) -> None:
        self._heap: list[Entry] = []
        self._seq = 0

    def push(self, when: float, timer: Timer) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, timer))

    def peek(self) -> Entry | None:
        return self._heap[0] if self._heap else None

    def pop(self) -> Entry:
        return heapq.heappop(self._heap)

    def size(self) -> int:
        return len(self._heap)

    def clear(self) -> None:
        self._heap.clear()
