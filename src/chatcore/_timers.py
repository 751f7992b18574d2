"""The engine's timers: one heap of absolute deadlines, invalidated lazily.

An entry is never removed when what it guards changes (a pong arrives, a
session resumes); instead each entry carries a generation, and the engine
checks it when the entry comes due. That keeps the hot paths free of heap work.
"""

from __future__ import annotations

import enum
import heapq
from typing import Any

__all__ = ["TimerKind", "Timers"]


class TimerKind(enum.IntEnum):
    PING = 1
    PONG_DEADLINE = 2
    GRACE = 3
    TYPING = 4


Entry = tuple[float, int, TimerKind, Any, Any]


class Timers:
    __slots__ = ("_heap", "_seq")

    def __init__(self) -> None:
        self._heap: list[Entry] = []
        self._seq = 0

    def push(self, when: float, kind: TimerKind, key: Any, gen: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, kind, key, gen))

    def peek(self) -> Entry | None:
        return self._heap[0] if self._heap else None

    def pop(self) -> Entry:
        return heapq.heappop(self._heap)

    def size(self) -> int:
        return len(self._heap)

    def clear(self) -> None:
        self._heap.clear()
