"""When the server writes what fan-out queued: the one rule, as pure functions.

The rule, as benchmarks/README.md ("When chatcore's server writes") states it:
queued frames are written at the end of the event-loop iteration that queued
them; only while the process has used at least 95% of a core over the last
whole window of 50 ms does a write wait, as long as the previous write took
and at most 5 ms, so that each write carries more messages.

Below saturation a write therefore costs no latency at all: the loop's own
iterations already batch whatever arrived while the previous one ran. At
saturation that natural batching still leaves one write per peer per
iteration; waiting a little longer lets one write carry several iterations'
messages, which is what keeps the rate when the core is the limit.

This module owns the decision only: the server hands in the clocks (wall
time and its own CPU time, both in seconds) and carries the decision out.
It reads no clock and does no I/O, so every case can be tested by value.
"""

from __future__ import annotations

__all__ = ["MAX_DELAY", "SATURATED", "WINDOW", "CoreUse", "flush_delay"]

SATURATED = 0.95
"""Share of one core (process CPU time over wall time) that counts as saturated."""
WINDOW = 0.05
"""Seconds of wall time a share is measured over (at least; a window ends at a flush)."""
MAX_DELAY = 0.005
"""The longest a saturated server holds a write back, in seconds."""


def flush_delay(share: float, last_flush: float) -> float:
    """Seconds the next write waits: 0 below saturation, else about one write's cost.

    ``share`` is the process's use of its core over the last whole window
    (see :class:`CoreUse`); ``last_flush`` how long the previous flush took.
    """
    if share < SATURATED or last_flush <= 0.0:
        return 0.0
    return min(last_flush, MAX_DELAY)


class CoreUse:
    """The share of a core the process used over its last whole window of wall time.

    :meth:`observe` is called with the wall clock and the process's CPU clock
    whenever the server is about to write or has written. A window closes at
    the first observation at least :data:`WINDOW` after it opened; its share
    stands until the next one closes. A window that spans an idle gap has a
    low share, so a server that went quiet is never judged saturated by what
    it did before the gap.
    """

    __slots__ = ("share", "_cpu", "_wall")

    def __init__(self, wall: float = 0.0, cpu: float = 0.0) -> None:
        self.share = 0.0
        self._wall = wall
        self._cpu = cpu

    def observe(self, wall: float, cpu: float) -> float:
        """Record the clocks; return the share of the last whole window."""
        span = wall - self._wall
        if span >= WINDOW:
            self.share = (cpu - self._cpu) / span
            self._wall, self._cpu = wall, cpu
        return self.share
