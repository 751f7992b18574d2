"""When the server writes what fan-out queued: the one rule, as pure functions.

The rule, as benchmarks/README.md ("When chatcore's server writes") states it:
queued frames are written at the end of the event-loop iteration that queued
them, and a write waits (as long as the previous one took, at most 10 ms)
only during the second after a one-second window in which the loop's thread
ran on a CPU at least 90% of the time.

Below saturation a write therefore costs no latency at all: the loop's own
iterations already batch whatever arrived while the previous one ran. At
saturation that natural batching still leaves one write per peer per
iteration; waiting lets one write carry several iterations' messages, which
is what keeps the rate when the core is the limit. Waiting lowers the load
it answers, so the verdict is held for a second rather than taken again at
every window (it would flip off in the next one); a server still saturated
renews it, one that is not writes at once again within a second.

Only time the thread *ran* counts. Time it spent runnable but waiting for a
CPU that other work held is not saturation: on a shared machine that wait
can be half the wall time while the server uses 55% of its core, and
batching there added 8-14 ms of latency for nothing (issue 15). And the
window is a whole second because use comes in bursts: a server at 48-57% of
its core had 50 ms stretches at 95-100%, and a rule judging 50 ms windows
held its writes back for a second after each.

This module owns the decision only: the server hands in the clocks (wall
time, and the seconds its loop's thread has run) and carries the decision
out. It reads no clock and does no I/O, so every case can be tested by value.
"""

from __future__ import annotations

__all__ = [
    "HOLD",
    "MAX_DELAY",
    "SATURATED",
    "WINDOW",
    "CoreUse",
    "flush_delay",
    "schedstat_busy",
]

SATURATED = 0.90
"""Share of wall time the loop's thread ran on a CPU that counts as saturated."""
WINDOW = 1.0
"""Seconds of wall time a share is measured over (at least: a window ends at a write)."""
HOLD = 1.0
"""Seconds a saturated window's verdict lasts."""
MAX_DELAY = 0.010
"""The longest a saturated server holds a write back, in seconds."""


def flush_delay(saturated: bool, last_flush: float) -> float:
    """Seconds the next write waits: 0 below saturation, else one write's cost.

    ``saturated`` is :meth:`CoreUse.saturated`; ``last_flush`` how long the
    previous flush took.
    """
    if not saturated or last_flush <= 0.0:
        return 0.0
    return min(last_flush, MAX_DELAY)


def schedstat_busy(line: bytes) -> float:
    """Seconds a thread ran on a CPU, from the text of its
    ``/proc/<pid>/task/<tid>/schedstat`` (nanoseconds run, waited, timeslices).
    The wait for a CPU is left out on purpose (see the module's docstring).
    Raises ValueError for text of another shape."""
    ran, _waited, _slices = line.split()
    return int(ran) / 1e9


class CoreUse:
    """How busy the loop was over its last whole window, and whether it is saturated.

    Before each write the server asks :meth:`due` with the wall clock; when a
    window is over it reads its busy clock (seconds the loop's thread has run:
    a read of ``/proc``, so once per window, not per write) and hands both to
    :meth:`close`. A window busy :data:`SATURATED` or more makes the server
    saturated for :data:`HOLD` seconds from its end. A window that spans an
    idle gap, or one spent waiting for a CPU held by other work, has a low share.
    """

    __slots__ = ("share", "until", "_busy", "_wall")

    def __init__(self, wall: float = 0.0, busy: float = 0.0) -> None:
        self.share = 0.0
        self.until = float("-inf")
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
            if self.share >= SATURATED:
                self.until = wall + HOLD
        self._wall, self._busy = wall, busy
        return self.share

    def saturated(self, wall: float) -> bool:
        """Whether a write at ``wall`` waits: within HOLD of a saturated window."""
        return wall < self.until

    def observe(self, wall: float, busy: float) -> bool:
        """:meth:`close` if the window is over; then :meth:`saturated`."""
        if self.due(wall):
            self.close(wall, busy)
        return self.saturated(wall)
