"""``Engine.counters()``: running totals a metrics endpoint reads.

The socket tests (tests/server/test_metrics.py) check them end to end; these
reach the cases a real socket makes slow or roundabout.
"""

from __future__ import annotations

from chatcore import Close, Config, Connect, Engine, Receive, SeededIds

NOW = 1_000.0


def test_a_reader_whose_own_replies_fill_its_outbox_is_counted_as_a_slow_consumer() -> None:
    engine = Engine(Config(outbox_frames=4, dm_inbox=False), SeededIds(1))
    engine.handle(Connect(conn=1, user="alice"), NOW)  # the welcome: one frame unwritten
    closes: list[Close] = []
    for _ in range(10):  # each answered with an error frame the reader never takes
        effects = engine.handle(Receive(conn=1, text="not json"), NOW)
        closes += [e for e in effects if isinstance(e, Close)]
    assert [(c.code, c.reason) for c in closes] == [(1013, "slow consumer")]
    counters = engine.counters()
    assert counters.slow_consumer_closes == 1
    # Three error frames went out; the fourth request was refused too, and its
    # error is what no longer fit. Frames after the close are not the engine's.
    assert counters.refusals == {"invalid_json": 4}


def test_counters_are_a_copy_the_caller_cannot_change() -> None:
    engine = Engine(Config(dm_inbox=False), SeededIds(1))
    engine.handle(Connect(conn=1, user="alice", resume="no-such-token"), NOW)
    engine.handle(Connect(conn=2, user="!"), NOW)  # an invalid name is refused
    seen = engine.counters()
    assert (seen.resumes, seen.resumes_failed) == (0, 1)
    assert seen.refusals == {"invalid_user_name": 1}
    seen.refusals["invalid_user_name"] = 99
    seen.resumes_failed = 99
    again = engine.counters()
    assert again.refusals == {"invalid_user_name": 1}
    assert again.resumes_failed == 1
