"""The engine's timers: one heap of absolute deadlines, invalidated lazily.

An entry is never removed when what it guards changes (a pong arrives, a
session resumes); instead each entry says what it was armed for, and the
engine checks that this still holds when the entry comes due. That keeps the
hot paths free of heap work. What a dead entry holds (a closed connection, an
ended session) would then stay in memory until its deadline, up to a ping
interval or a grace period away: at a few hundred connections a second that
is thousands of departed sessions. So the engine counts entries it knows went
stale and, once they are most of the heap, drops them all in one pass
(:meth:`Timers.compact`), which costs O(1) per stale entry over time.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import NamedTuple

from ._room import Room
from ._session import Connection, Session

__all__ = [
    "GraceOver",
    "HeadProbe",
    "PingDue",
    "PongDue",
    "PresenceDue",
    "Timer",
    "Timers",
    "TypingOver",
]


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


class PresenceDue(NamedTuple):
    """Time to tell ``room`` who came and went since its last ``presence`` frame."""

    room: Room


class HeadProbe(NamedTuple):
    """Time to ask the log for the heads of idle held rooms (``_cluster``);
    ``gen`` is the probe's arming, stale once re-armed or disarmed."""

    gen: int


Timer = PingDue | PongDue | GraceOver | TypingOver | PresenceDue | HeadProbe

Entry = tuple[float, int, Timer]


_COMPACT_MIN = 64
"""Stale entries below which the heap is never compacted (a pass is not worth it)."""


class Timers:
    __slots__ = ("_heap", "_seq", "stale")

    def __init__(self) -> None:
        self._heap: list[Entry] = []
        self._seq = 0
        # Entries known to guard nothing any more (reported with went_stale()).
        self.stale = 0

    def push(self, when: float, timer: Timer) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, timer))

    def peek(self) -> Entry | None:
        return self._heap[0] if self._heap else None

    def pop(self) -> Entry:
        return heapq.heappop(self._heap)

    def discard(self) -> None:
        """Pop the first entry, found stale when it came due."""
        heapq.heappop(self._heap)
        if self.stale:
            self.stale -= 1

    def size(self) -> int:
        return len(self._heap)

    def went_stale(self, count: int = 1) -> None:
        """``count`` entries no longer guard anything; see :meth:`compact`."""
        self.stale += count

    def compact(self, live: Callable[[Timer], bool]) -> None:
        """Drop every entry ``live`` rejects, once the stale ones are most of the heap."""
        if self.stale < _COMPACT_MIN or 2 * self.stale < len(self._heap):
            return
        heap = [entry for entry in self._heap if live(entry[2])]
        heapq.heapify(heap)
        self._heap = heap
        self.stale = 0

    def clear(self) -> None:
        self._heap.clear()
        self.stale = 0
