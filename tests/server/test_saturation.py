"""The server's write rule, decided by value: when does a write wait, and for how long.

The rule (benchmarks/README.md): write at the end of the loop iteration that
queued the frames; only while the loop had no idle time (it ran or waited for
a CPU 95% of the last whole 50 ms window) does a write wait, as long as the
previous write took, at most 5 ms. No clock is read here: the clocks are arguments.
"""

from __future__ import annotations

import pytest

from chatcore_server._saturation import (
    MAX_DELAY,
    SATURATED,
    WINDOW,
    CoreUse,
    flush_delay,
    schedstat_busy,
)


@pytest.mark.parametrize("share", [0.0, 0.5, 0.67, 0.88, 0.9, SATURATED - 0.001])
@pytest.mark.parametrize("last_flush", [0.0, 0.0002, 0.003, 0.010, 1.0])
def test_below_saturation_a_write_never_waits(share: float, last_flush: float) -> None:
    # However costly the last flush was (1,000 peers: several ms), a server with
    # spare CPU writes at the end of the iteration: no added latency.
    assert flush_delay(share, last_flush) == 0.0


@pytest.mark.parametrize("share", [SATURATED, 0.99, 1.0])
def test_a_saturated_server_waits_as_long_as_the_last_flush_took(share: float) -> None:
    assert flush_delay(share, 0.002) == 0.002
    assert flush_delay(share, 0.0003) == 0.0003


def test_the_wait_is_bounded() -> None:
    assert flush_delay(1.0, 0.2) == MAX_DELAY
    assert MAX_DELAY <= 0.005


def test_no_wait_without_a_flush_to_measure() -> None:
    assert flush_delay(1.0, 0.0) == 0.0


def busy(core: CoreUse, start: float, seconds: float, share: float, step: float = 0.001) -> float:
    """Observe ``seconds`` of wall time in ``step`` s turns, busy ``share`` of each."""
    wall, cpu = start, start * share
    verdict = 0.0
    for _ in range(round(seconds / step)):
        wall += step
        cpu += step * share
        verdict = core.observe(wall, cpu)
    return verdict


def test_share_is_measured_over_whole_windows() -> None:
    core = CoreUse(wall=0.0, busy=0.0)
    # Inside the first window nothing is judged yet, however busy the turns are.
    assert core.observe(WINDOW / 2, WINDOW / 2) == 0.0
    # The window closes at the first observation at least WINDOW after it opened.
    assert core.observe(WINDOW, WINDOW) == pytest.approx(1.0)
    # And its verdict stands until the next window closes.
    assert core.observe(WINDOW * 1.5, WINDOW) == pytest.approx(1.0)
    assert core.observe(WINDOW * 2, WINDOW * 1.5) == pytest.approx(0.5)


def test_a_server_busy_88_percent_of_the_time_is_not_saturated() -> None:
    # The reported case: p50 went to 6-15 ms at 67-88% CPU. Such a server never waits.
    core = CoreUse()
    share = busy(core, 0.0, 2.0, 0.88)
    assert share == pytest.approx(0.88)
    assert flush_delay(share, 0.004) == 0.0


def test_a_saturated_server_waits_and_stops_waiting_once_load_falls() -> None:
    core = CoreUse()
    share = busy(core, 0.0, 1.0, 1.0)
    assert flush_delay(share, 0.004) == 0.004
    share = busy(core, 1.0, 1.0, 0.6)
    assert flush_delay(share, 0.004) == 0.0


def test_an_idle_gap_ends_saturation() -> None:
    # Saturated, then nothing to do for a second: the first write after the gap
    # is judged by a window that holds the gap, not by the busy past.
    core = CoreUse()
    busy(core, 0.0, 1.0, 1.0)
    assert core.observe(2.0, 1.0 + 0.0005) < 0.1
    assert flush_delay(core.share, 0.004) == 0.0


class Loop:
    """Stands in for the asyncio loop: records how the server asked to be called back."""

    def __init__(self) -> None:
        self.soon: list[object] = []
        self.later: list[float] = []

    def call_soon(self, callback: object) -> None:
        self.soon.append(callback)

    def call_later(self, delay: float, callback: object) -> None:
        self.later.append(delay)


class Gauge:
    """A CoreUse whose last window had ``share`` (and none closes meanwhile)."""

    def __init__(self, share: float) -> None:
        self.share = share

    def due(self, wall: float) -> bool:
        return False


@pytest.mark.parametrize(
    ("share", "soon", "later"),
    [(0.0, 1, []), (0.88, 1, []), (0.97, 0, [0.003])],
)
def test_the_server_schedules_its_flush_by_the_rule(
    share: float, soon: int, later: list[float]
) -> None:
    # The server carries the decision out: at the end of the iteration (call_soon)
    # unless saturated, then after the last flush's cost.
    from chatcore_server import ChatServer

    server = ChatServer()
    loop = Loop()
    server._loop = loop  # type: ignore[assignment]
    server._core = Gauge(share)  # type: ignore[assignment]
    server._flush_cost = 0.003
    server.dirty.append(object())  # type: ignore[arg-type]
    server._schedule_flush()
    server._schedule_flush()  # one flush per iteration, however many turns end in it
    assert (len(loop.soon), loop.later) == (soon, later)


def test_a_window_is_judged_only_once_it_is_over() -> None:
    core = CoreUse(wall=0.0, busy=0.0)
    assert not core.due(WINDOW / 2)
    assert core.due(WINDOW)
    assert core.close(WINDOW, WINDOW * 0.97) == pytest.approx(0.97)
    assert not core.due(WINDOW * 1.5)  # the next window opened at the close


def test_the_server_closes_a_window_with_its_busy_clock() -> None:
    # Wired to a real clock: whatever it reads, a share is a share of wall time.
    from chatcore_server import ChatServer

    server = ChatServer()
    core = server._core
    core._wall -= 1.0  # a window opened a second ago
    server._loop = Loop()  # type: ignore[assignment]
    server.dirty.append(object())  # type: ignore[arg-type]
    server._schedule_flush()
    assert 0.0 <= core.share <= 1.05
    assert not core.due(core._wall)


def test_waiting_for_a_cpu_counts_as_busy() -> None:
    # 40 ms run and 10 ms waited behind other work on the core: 50 ms busy. A loop
    # that got 80% of a shared core and wanted the rest is saturated.
    assert schedstat_busy(b"40000000 10000000 123\n") == pytest.approx(0.050)
    core = CoreUse(wall=0.0, busy=0.0)
    assert core.close(WINDOW, schedstat_busy(b"40000000 10000000 9\n")) >= SATURATED


def test_schedstat_of_another_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="unpack"):
        schedstat_busy(b"")
