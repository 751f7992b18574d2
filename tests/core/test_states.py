"""Every session state against every input, through the public API (as h2 tests its states).

The expectations come from the engine's own table (``chatcore._session.TABLE``):
for every (state, input) pair, the engine is driven into the state the way a
real client and store would drive it, given the input, and must end in the
state the table names and do what its action says. The diagram in
docs/engine.md is checked against the same table.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from chatcore import (
    TRANSITIONS,
    Close,
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
from chatcore._session import TABLE, SessionAction, Transition, diagram, next_state
from chatcore_store import MemoryStore, is_storage_effect

S, In, Do = SessionState, SessionInput, SessionAction
GRACE = 30.0
ENGINE_MD = Path(__file__).resolve().parents[2] / "docs" / "engine.md"


class Harness:
    """An engine and a store that answers LoadRoom only when told to."""

    def __init__(self) -> None:
        self.engine = Engine(Config(grace_period=GRACE), SeededIds(5))
        self.store = MemoryStore()
        self.now = 100.0
        self.held: list[LoadRoom] = []
        self.frames: dict[int, list[dict[str, Any]]] = {}
        self.closed: dict[int, int] = {}
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
            elif isinstance(effect, Close):
                self.closed[effect.conn] = effect.code
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


def test_the_table_lists_every_pair_of_a_session_that_is_not_closed() -> None:
    live = [s for s in SessionState if s is not S.CLOSED]
    assert set(TABLE) == {(s, i) for s in live for i in SessionInput}
    assert dict(TRANSITIONS) == {pair: t.next for pair, t in TABLE.items()}


def test_a_closed_session_takes_no_input() -> None:
    for event in SessionInput:
        with pytest.raises(LocalProtocolError):
            next_state(S.CLOSED, event)


def _sent_to(h: Harness, conn: int, before: int) -> list[dict[str, Any]]:
    return h.frames.get(conn, [])[before:]


@pytest.mark.parametrize(("pair", "transition"), sorted(TABLE.items(), key=str), ids=str)
def test_every_state_against_every_input(
    pair: tuple[SessionState, SessionInput], transition: Transition
) -> None:
    state, event = pair
    h, conn, sid, token = reach(state)
    assert sid is not None
    seen = len(h.frames.get(conn, []))
    apply(h, event, conn, token)
    info = h.engine.session(sid)
    assert (S.CLOSED if info is None else info.state) is transition.next
    new = _sent_to(h, conn, seen)
    match transition.action:
        case Do.WELCOME:
            assert [f["type"] for f in new][:1] == ["welcome"]
        case Do.HOLD:
            assert new == []  # the join is answered after the welcome
        case Do.SERVE:
            assert [(f["type"], f["room"]) for f in new] == [("members", "tech")]
        case Do.TAKE_OVER:
            assert info is not None
            assert info.conn == h.next_conn != conn
            if state is not S.DETACHED:
                assert h.closed[conn] == 1000
        case Do.WAIT:
            assert info is not None
            assert info.conn is None
            assert h.engine.next_deadline() == h.now + GRACE
        case Do.END:
            assert info is None
        case Do.IGNORE:
            assert transition.next is state
            assert new == []
            assert conn not in h.closed
            assert info is not None
            if state is not S.DETACHED:
                assert info.conn == conn
        case other:
            pytest.fail(f"no check for {other}")


def test_the_diagram_in_the_docs_is_drawn_from_the_table() -> None:
    text = ENGINE_MD.read_text()
    blocks = re.findall(r"```mermaid\n(stateDiagram-v2\n.*?)\n```", text, re.S)
    assert blocks == [diagram()]


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


def test_a_connection_closed_as_slow_in_its_welcome_is_closed_last_and_runs_no_held_frame() -> None:
    h = Harness()
    h.engine = Engine(Config(outbox_frames=2), SeededIds(5))
    conn = h.connect(rooms=("held-1", "held-2"))
    h.feed(Receive(conn=conn, text='{"type":"send","room":"held-1","text":"early"}'))
    first, second = h.held
    h.held = []
    for answer in h.store.execute_now([first]):
        h.feed(answer)
    (loaded,) = h.store.execute_now([second])
    effects = h.engine.handle(loaded, h.now)  # the welcome: welcome, members, members...
    h.run(effects)
    assert effects[-1] == Close(conn=conn, code=1013, reason="slow consumer")
    assert [f["type"] for f in h.frames[conn]] == ["welcome", "members"]
    assert h.store.messages("held-1") == []  # the frame held for the welcome went with it
    info = h.engine.session(h.welcome(conn)["session"])
    assert info is not None
    assert info.state is S.DETACHED


def test_a_connection_closed_as_slow_is_handed_nothing_more_in_that_step() -> None:
    h = Harness()
    h.engine = Engine(Config(outbox_bytes=700), SeededIds(5))
    for i in range(40):  # a crowded room: its member list alone overflows the outbox
        h.feed(Connect(conn=1000 + i, user=f"member{i:04d}", rooms=("crowded",)))
    conn = h.connect(rooms=("held-1", "crowded", "held-3"))
    h.release()
    assert h.closed[conn] == 1013
    # the small member list after the crowded one would fit, but the connection is closing
    assert [(f["type"], f.get("room")) for f in h.frames[conn]] == [
        ("welcome", None),
        ("members", "held-1"),
    ]
