"""Every session state against every input, through the public API (as h2 tests its states).

The expected table is written out here by hand, independently of the engine's
own TRANSITIONS, and the engine is driven into each state the way a real
client and store would drive it.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from chatcore import (
    TRANSITIONS,
    Config,
    Connect,
    Deliver,
    Disconnected,
    Effect,
    Engine,
    LoadRoom,
    LocalProtocolError,
    Receive,
    SeededIds,
    SessionInput,
    SessionState,
    Shutdown,
    Written,
)
from chatcore_store import MemoryStore, is_storage_effect

S, In = SessionState, SessionInput
GRACE = 30.0

EXPECTED: dict[tuple[SessionState, SessionInput], SessionState] = {
    (S.OPENING, In.READY): S.LIVE,
    (S.OPENING, In.FRAME): S.OPENING,
    (S.OPENING, In.DROP): S.CLOSED,
    (S.OPENING, In.RESUME): S.OPENING,  # no token was issued yet: the newcomer is someone else
    (S.OPENING, In.EXPIRE): S.OPENING,
    (S.OPENING, In.SHUTDOWN): S.CLOSED,
    (S.RESUMING, In.READY): S.LIVE,
    (S.RESUMING, In.FRAME): S.RESUMING,
    (S.RESUMING, In.DROP): S.DETACHED,
    (S.RESUMING, In.RESUME): S.RESUMING,
    (S.RESUMING, In.EXPIRE): S.RESUMING,
    (S.RESUMING, In.SHUTDOWN): S.CLOSED,
    (S.LIVE, In.READY): S.LIVE,
    (S.LIVE, In.FRAME): S.LIVE,
    (S.LIVE, In.DROP): S.DETACHED,
    (S.LIVE, In.RESUME): S.RESUMING,
    (S.LIVE, In.EXPIRE): S.LIVE,
    (S.LIVE, In.SHUTDOWN): S.CLOSED,
    (S.DETACHED, In.READY): S.DETACHED,
    (S.DETACHED, In.FRAME): S.DETACHED,
    (S.DETACHED, In.DROP): S.DETACHED,
    (S.DETACHED, In.RESUME): S.RESUMING,
    (S.DETACHED, In.EXPIRE): S.CLOSED,
    (S.DETACHED, In.SHUTDOWN): S.CLOSED,
}


class Harness:
    """An engine and a store that answers LoadRoom only when told to."""

    def __init__(self) -> None:
        self.engine = Engine(Config(grace_period=GRACE), SeededIds(5))
        self.store = MemoryStore()
        self.now = 100.0
        self.held: list[LoadRoom] = []
        self.frames: dict[int, list[dict[str, Any]]] = {}
        self.next_conn = 0

    def feed(self, command: Any) -> None:
        self.run(self.engine.handle(command, self.now))

    def run(self, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, LoadRoom) and effect.room.startswith("held"):
                self.held.append(effect)
            elif is_storage_effect(effect):
                for answer in self.store.execute_now([effect]):
                    self.feed(answer)
            elif isinstance(effect, Deliver):
                for conn in effect.to:
                    self.frames.setdefault(conn, []).append(json.loads(effect.data))
                    self.feed(Written(conn=conn, frames=1, nbytes=effect.size))

    def release(self) -> None:
        held, self.held = self.held, []
        for effect in held:
            for answer in self.store.execute_now([effect]):
                self.feed(answer)

    def connect(self, rooms: tuple[str, ...] = (), resume: str | None = None) -> int:
        self.next_conn += 1
        self.feed(Connect(conn=self.next_conn, user="alice", rooms=rooms, resume=resume))
        return self.next_conn

    def welcome(self, conn: int) -> dict[str, Any]:
        return next(f for f in self.frames[conn] if f["type"] == "welcome")


def reach(state: SessionState) -> tuple[Harness, int, str | None, str | None]:
    """A harness with one session in ``state``: (harness, its conn, session id, token)."""
    h = Harness()
    if state is S.OPENING:
        conn = h.connect(rooms=("held-1",))
        info = h.engine.session_of(conn)
        assert info is not None
        assert info.state is S.OPENING
        return h, conn, info.id, None
    conn = h.connect(rooms=("general",))
    welcome = h.welcome(conn)
    sid, token = welcome["session"], welcome["resume"]
    if state is S.LIVE:
        return h, conn, sid, token
    h.feed(Disconnected(conn=conn))
    if state is S.DETACHED:
        return h, conn, sid, token
    conn = h.connect(rooms=("general", "held-2"), resume=token)
    return h, conn, sid, token


def apply(h: Harness, event: SessionInput, conn: int, token: str | None) -> None:
    match event:
        case In.READY:
            h.release()
        case In.FRAME:
            h.feed(Receive(conn=conn, text='{"type":"join","room":"tech"}'))
        case In.DROP:
            h.feed(Disconnected(conn=conn))
        case In.RESUME:
            h.connect(rooms=("held-3",), resume=token or "not-issued-yet")
        case In.EXPIRE:
            h.now += GRACE + 1
            h.run(h.engine.tick(h.now))
        case In.SHUTDOWN:
            h.feed(Shutdown())


def test_the_expected_table_covers_every_pair() -> None:
    live = [s for s in SessionState if s is not S.CLOSED]
    assert set(EXPECTED) == {(s, i) for s in live for i in SessionInput}


@pytest.mark.parametrize(("state", "event"), sorted(EXPECTED, key=str), ids=str)
def test_every_state_against_every_input(state: SessionState, event: SessionInput) -> None:
    h, conn, sid, token = reach(state)
    assert sid is not None
    apply(h, event, conn, token)
    info = h.engine.session(sid)
    got = S.CLOSED if info is None else info.state
    assert got is EXPECTED[state, event]


@pytest.mark.parametrize(("pair", "target"), sorted(TRANSITIONS.items(), key=str), ids=str)
def test_the_engines_table_agrees_with_what_it_does(
    pair: tuple[SessionState, SessionInput], target: SessionState
) -> None:
    assert EXPECTED[pair] is target


def test_host_misuse_raises_before_any_change() -> None:
    h = Harness()
    conn = h.connect(rooms=("general",))
    with pytest.raises(LocalProtocolError):
        h.engine.handle(Connect(conn=conn, user="bob"), h.now)
    with pytest.raises(LocalProtocolError):
        h.engine.handle(Written(conn=conn, frames=-1, nbytes=0), h.now)
    assert h.engine.members("general") == ("alice",)
    assert h.engine.connections == 1


def test_a_frame_held_before_the_welcome_runs_after_it() -> None:
    h = Harness()
    conn = h.connect(rooms=("held-1",))
    h.feed(Receive(conn=conn, text='{"type":"send","room":"held-1","text":"early"}'))
    assert conn not in h.frames
    h.release()
    kinds = [f["type"] for f in h.frames[conn]]
    assert kinds == ["welcome", "members", "ack"]
    assert [m.text for m in h.store.messages("held-1")] == ["early"]


def test_too_many_frames_before_the_welcome_are_refused() -> None:
    h = Harness()
    h.engine = Engine(Config(max_pending_frames=2), SeededIds(5))
    conn = h.connect(rooms=("held-1",))
    for i in range(3):
        h.feed(
            Receive(conn=conn, text=json.dumps({"type": "send", "room": "held-1", "text": str(i)}))
        )
    assert [f["code"] for f in h.frames[conn]] == ["rate_limited"]
    h.release()
    assert [m.text for m in h.store.messages("held-1")] == ["0", "1"]
