"""When the server writes what fan-out queued: the one rule, as pure functions.

The rule, as benchmarks/README.md ("When chatcore's server writes") states it:
queued frames are written at the end of the event-loop iteration that queued
them; only while the loop has had no idle time (its thread ran or waited for
a CPU at least 95% of the last whole window of 50 ms) does a write wait, as
long as the previous write took and at most 5 ms, so that each write carries
more messages.

Below saturation a write therefore costs no latency at all: the loop's own
iterations already batch whatever arrived while the previous one ran. At
saturation that natural batching still leaves one write per peer per
iteration; waiting a little longer lets one write carry several iterations'
messages, which is what keeps the rate when the core is the limit. Time the
thread spent waiting for a CPU counts as busy: a server whose core is shared
with other work is saturated when it cannot get more of it, whatever share of
the core it got.

This module owns the decision only: the server hands in the clocks (wall
time, and the seconds its loop's thread has run or waited to run) and
carries the decision out. It reads no clock and does no I/O, so every case
can be tested by value.
"""

from __future__ import annotations

__all__ = ["MAX_DELAY", "SATURATED", "WINDOW", "CoreUse", "flush_delay", "schedstat_busy"]

SATURATED = 0.95
"""Share of wall time the loop's thread ran or waited to run that counts as saturated."""
WINDOW = 0.05
"""Seconds of wall time a share is measured over (at least: a window ends at a write)."""
MAX_DELAY = 0.005
"""The longest a saturated server holds a write back, in seconds."""


def flush_delay(share: float, last_flush: float) -> float:
    """Seconds the next write waits: 0 below saturation, else about one write's cost.

    ``share`` is the loop's busy share over the last whole window (see
    :class:`CoreUse`); ``last_flush`` how long the previous flush took.
    """
    if share < SATURATED or last_flush <= 0.0:
        return 0.0
    return min(last_flush, MAX_DELAY)


def schedstat_busy(line: bytes) -> float:
    """Seconds a thread ran plus seconds it waited for a CPU, from the text of its
    ``/proc/<pid>/task/<tid>/schedstat`` (nanoseconds run, waited, timeslices).
    Raises ValueError for text of another shape."""
    ran, waited = line.split()[:2]
    return (int(ran) + int(waited)) / 1e9


class CoreUse:
    """The share of wall time the loop was busy over its last whole window.

    Before each write the server asks :meth:`due` with the wall clock; when a
    window is over it reads its busy clock (seconds the loop's thread has run
    or waited for a CPU: a read of ``/proc``, so once per window, not per
    write) and hands both to :meth:`close`. A window's share stands until the
    next one closes. A window that spans an idle gap has a low share, so a
    server that went quiet is never judged saturated by what it did before.
    """

    __slots__ = ("share", "_busy", "_wall")

    def __init__(self, wall: float = 0.0, busy: float = 0.0) -> None:
        self.share = 0.0
        self._wall = wall
        self._busy = busy

    def due(self, wall: float) -> bool:
        """True when the window opened at least :data:`WINDOW` before ``wall``."""
        return wall - self._wall >= WINDOW

    def close(self, wall: float, busy: float) -> float:
        """End the window at ``wall`` with the busy clock at ``busy``; open the next.
        Returns the share of the window just closed."""
        span = wall - self._wall
        if span > 0.0:
            self.share = (busy - self._busy) / span
        self._wall, self._busy = wall, busy
        return self.share

    def observe(self, wall: float, busy: float) -> float:
        """:meth:`close` if the window is over; the share of the last whole window."""
        if self.due(wall):
            self.close(wall, busy)
        return self.share
