"""Request limits, invalid frames, plain-text lines and a close without a code,
as a client sees them: through the simulator, on its virtual clock."""

from __future__ import annotations

import pytest

from chatcore import Config, Mode, dm_room
from chatcore_sim import Simulation


def test_forty_joins_of_rooms_not_in_memory_fit_in_the_burst() -> None:
    # Each room is loaded from the log first; the join must cost one request, not two.
    sim = Simulation(seed=1)
    alice = sim.connect("alice", room="general")
    alice.take()
    for i in range(40):
        alice.join(f"room-{i}")
    assert alice.of_type("error") == []
    assert [e["room"] for e in alice.of_type("members")][1:] == [f"room-{i}" for i in range(40)]


def test_a_request_past_the_burst_is_refused_naming_what_it_was_for() -> None:
    sim = Simulation(Config(request_burst=60), seed=1)
    alice = sim.connect("alice", room="general")
    for i in range(60):
        alice.join(f"room-{i}")
    assert alice.of_type("error") == []
    alice.join("one-too-many")
    alice.send("hello", id="c-1")
    alice.send("hello")
    alice.typing()
    alice.dm("bob", "psst")
    alice.dm("bob", "psst", id="c-2")
    errors = alice.of_type("error")
    assert [e["code"] for e in errors] == ["rate_limited"] * 6
    assert [e["ref"] for e in errors] == [
        "one-too-many",
        "c-1",
        "general",
        "general",
        dm_room("alice", "bob"),
        "c-2",
    ]
    assert all(e["retry_after"] > 0 for e in errors)
    assert "one-too-many" not in sim.engine.rooms()  # the request was dropped


def test_invalid_frames_are_requests_too_and_are_rate_limited_past_the_burst() -> None:
    sim = Simulation(Config(request_burst=60, request_per_second=30.0), seed=1)
    alice = sim.connect("alice", room="general")
    bob = sim.connect("bob", room="general")
    alice.take()
    for _ in range(200):
        alice.send_raw("{}")
    errors = alice.take()
    # protocol.md section 5: the first 60 get their own error, the rest rate_limited,
    # each with retry_after; the connection stays open.
    assert [e["code"] for e in errors] == ["unknown_type"] * 60 + ["rate_limited"] * 140
    assert errors[60]["retry_after"] == pytest.approx(1 / 30, abs=0.001)
    assert {e["ref"] for e in errors} == {None}
    assert alice.connected
    # Invalid frames use up the same tokens as valid requests...
    alice.send("too soon")
    assert alice.take()[-1]["code"] == "rate_limited"
    assert bob.texts() == []
    # ...and the tokens come back with time.
    sim.advance(1)
    alice.send("later")
    assert bob.texts() == ["later"]


def test_oversized_frames_are_rate_limited_too() -> None:
    sim = Simulation(Config(request_burst=5, max_text_bytes=100, max_frame_bytes=100), seed=1)
    alice = sim.connect("alice", room="general")
    for _ in range(8):
        alice.send_raw("x" * 101)
    assert [e["code"] for e in alice.of_type("error")] == ["too_large"] * 5 + ["rate_limited"] * 3


@pytest.mark.parametrize(
    ("line", "stored"),
    [
        ("hi\n", "hi"),
        ("hi\r\n", "hi"),
        ("hi", "hi"),
        ("two lines\n\n", "two lines\n"),  # only one line ending is the frame's
        ("  spaced  \n", "  spaced  "),
    ],
)
def test_plain_text_line_is_stored_and_delivered_without_its_line_ending(
    line: str, stored: str
) -> None:
    sim = Simulation(seed=1)
    alice = sim.connect("alice", room="general")
    carol = sim.connect("carol", room="general", mode=Mode.TEXT)
    bob = sim.connect("bob", room="general", mode=Mode.TEXT)
    bob.send_raw(line)
    assert [m.text for m in sim.store.messages("general")] == [stored]
    assert alice.texts() == [stored]
    assert carol.lines()[-len(stored.split("\n")) :] == f"bob: {stored}".split("\n")


def test_an_empty_plain_text_line_is_an_empty_message() -> None:
    sim = Simulation(seed=1)
    bob = sim.connect("bob", room="general", mode=Mode.TEXT)
    bob.send_raw("\n")
    assert bob.lines()[-1] == "error: text must not be empty"
    assert sim.store.messages("general") == []


def test_a_close_without_a_code_is_a_goodbye_others_see_at_once() -> None:
    # websocat sends a close frame with no status code on quit; the server reads 1005.
    sim = Simulation(Config(grace_period=30), seed=1)
    alice = sim.connect("alice", room="general")
    bob = sim.connect("bob", room="general", mode=Mode.TEXT)
    assert bob.conn is not None
    info = sim.engine.session_of(bob.conn)
    assert info is not None
    alice.take()
    sim.close(bob, 1005)
    assert alice.take() == [{"type": "left", "room": "general", "user": "bob"}]
    assert sim.engine.session(info.id) is None
    assert sim.engine.members("general") == ("alice",)


def test_a_close_with_going_away_still_waits_for_a_resume() -> None:
    sim = Simulation(Config(grace_period=30), seed=1)
    alice = sim.connect("alice", room="general")
    bob = sim.connect("bob", room="general")
    alice.take()
    sim.close(bob, 1001)
    assert alice.take() == []
    sim.resume(bob)
    assert bob.of_type("welcome")[-1]["resumed"] is True
