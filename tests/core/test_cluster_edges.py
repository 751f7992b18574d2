"""Several processes: the bus's wire format, and the engine's cluster paths one
at a time (answers nobody waits for, races during a claim, bounds), driven
through the cluster simulator or the engine itself."""

from __future__ import annotations

from typing import Any

import pytest

from chatcore import (
    Appended,
    BusResumed,
    ClaimRefused,
    ClaimSession,
    Config,
    Connect,
    Disconnected,
    Engine,
    HandshakeError,
    HeadsFailed,
    HeadsLoaded,
    LoadHeads,
    LoadRoom,
    LocalProtocolError,
    MemberArrived,
    MemberDeparted,
    MembersAsked,
    MembersTold,
    Message,
    Mode,
    ParkedRoom,
    ProcessGone,
    ReadMarked,
    Receive,
    RoomHeld,
    RoomLoaded,
    RoomReleased,
    SeededIds,
    SessionClaimed,
    SessionParked,
    SessionTaken,
    Share,
    Shared,
    Subscribed,
    TypingChanged,
    UserHeld,
    UserReleased,
    bus_channels,
    bus_fact,
    bus_message,
    parked_record,
    parse_bus,
    parse_connect,
    parse_parked,
)
from chatcore_sim import Cluster

T = 1000.0


def message(offset: int, epoch: str = "e1", room: str = "general") -> Message:
    return Message(room=room, offset=offset, epoch=epoch, sender="zed", text=f"t{offset}", ts=1)


# -- the wire format of the bus -------------------------------------------------------


def test_every_fact_and_message_survives_the_bus() -> None:
    facts = [
        MemberArrived(user="ann"),
        MemberDeparted(user="ann"),
        TypingChanged(user="ann", active=False),
        ReadMarked(user="ann", offset=3),
        MembersAsked(),
        MembersTold(users=("ann", "bo")),
    ]
    for fact in facts:
        assert parse_bus(bus_fact("p1", "general", fact)) == Shared(
            origin="p1", room="general", fact=fact
        )
    m = Message(room="dm:a:b", offset=2, epoch="e", sender="a", text="hi", ts=5, client_id="c")
    assert parse_bus(bus_message(m)) == Appended(message=m)
    assert bus_channels("dm:a:b") == ("user:a", "user:b")
    assert bus_channels("general") == ("room:general",)


@pytest.mark.parametrize(
    "payload",
    [
        "not json",
        "[1]",
        '{"m": [1, 2]}',
        '{"m": ["general", 0, "e", "a", "t", 1, null, false]}',
        '{"m": ["general", 1, "e", "a", "t", 1, null, "no"]}',
        '{"o": "p", "r": "bad room!", "f": {"k": "ask"}}',
        '{"o": "p", "r": "general", "f": {"k": "in", "u": "bad name!"}}',
        '{"o": "p", "r": "general", "f": {"k": "here", "us": ["ok", "bad name!"]}}',
        '{"o": "p", "r": "general", "f": {"k": "here", "us": "ann"}}',
        '{"o": "p", "r": "general", "f": {"k": "typing", "u": "ann", "a": 1}}',
        '{"o": "p", "r": "general", "f": {"k": "read", "u": "ann", "o": -1}}',
        '{"o": "p", "r": "general", "f": {"k": "dance", "u": "ann"}}',
        '{"o": "p", "r": "general"}',
    ],
)
def test_a_peer_s_garbage_on_the_bus_is_ignored(payload: str) -> None:
    assert parse_bus(payload) is None


def test_a_parked_record_is_claimed_only_by_its_user() -> None:
    parked = SessionParked(
        token="tok",
        id="sid",
        user="ann",
        rooms=(ParkedRoom(room="general", offset=4, epoch="e", read=2),),
        until=5.0,
    )
    record = parked_record(parked)
    assert parse_parked(7, "ann", record) == SessionClaimed(
        ref=7, id="sid", token="tok", user="ann", rooms=parked.rooms
    )
    assert parse_parked(7, "mallory", record) is None
    assert parse_parked(7, "ann", "garbage") is None
    assert parse_parked(7, "ann", '{"u": "ann", "r": [], "id": 1, "t": "x"}') is None


def test_a_resume_names_the_epoch_of_each_offset() -> None:
    cmd = parse_connect(1, "user=ann&resume=t&offset=dm:ann:bo:3&epoch=dm:ann:bo:e9", Mode.JSON)
    assert cmd.epochs == {"dm:ann:bo": "e9"}
    assert cmd.offsets == {"dm:ann:bo": 3}
    with pytest.raises(HandshakeError):
        parse_connect(1, "user=ann&epoch=general", Mode.JSON)


# -- the engine, one path at a time ---------------------------------------------------------


class One:
    """One engine with ``Config(cluster=True)``; the test answers the log."""

    def __init__(self, config: Config | None = None) -> None:
        self.engine = Engine(config or Config(cluster=True), SeededIds(1))
        self.effects: list[Any] = []

    def do(self, command: Any) -> list[Any]:
        out = self.engine.handle(command, T)
        self.effects.extend(out)
        return out

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.effects if isinstance(e, kind)]

    def open(self, conn: int, user: str, room: str = "general", head: int = 0) -> None:
        out = self.do(Connect(conn=conn, user=user, rooms=(room,)))
        if any(isinstance(e, LoadRoom) for e in out):
            self.do(RoomLoaded(room=room, epoch="e1", head=head))
        for ref in [e.ref for e in out if type(e).__name__ == "LoadInbox"]:
            from chatcore import InboxLoaded

            self.do(InboxLoaded(ref=ref, rooms=()))


def test_holding_is_said_once_per_room_and_user_and_not_without_cluster() -> None:
    one = One()
    one.open(1, "ann")
    one.open(2, "bo")
    assert one.of(RoomHeld) == [RoomHeld(room="general")]
    assert one.of(UserHeld) == [UserHeld(user="ann"), UserHeld(user="bo")]
    # Taken up only once the bus confirmed its channel.
    assert not [e for e in one.of(Share) if isinstance(e.fact, MembersAsked | MembersTold)]
    out = one.do(Subscribed(rooms=("general", "elsewhere")))
    assert [e.rooms for e in out if isinstance(e, LoadHeads)] == [("general",)]
    assert [e for e in out if isinstance(e, Share)] == [
        Share(room="general", fact=MembersAsked()),
        Share(room="general", fact=MembersTold(users=("ann", "bo"), seq=3)),
    ]
    assert one.do(Subscribed(rooms=("general",))) == []  # (once)
    one.do(Disconnected(conn=1, code=1000))
    one.do(Disconnected(conn=2, code=1000))
    assert one.of(RoomReleased) == [RoomReleased(room="general")]
    assert one.of(UserReleased) == [UserReleased(user="ann"), UserReleased(user="bo")]
    alone = One(Config())
    alone.open(1, "ann")
    alone.do(Disconnected(conn=1, code=4000))
    names = {type(e).__name__ for e in alone.effects}
    assert not names & {"RoomHeld", "UserHeld", "Share", "SessionParked", "LoadHeads"}


def test_head_answers_nobody_waits_for_and_failures_change_nothing() -> None:
    one = One()
    one.open(1, "ann")
    assert one.do(HeadsLoaded(ref=999, heads={"general": (5, "e1")})) == []
    [probe] = [e for e in one.do(BusResumed()) if isinstance(e, LoadHeads)]
    assert one.do(HeadsFailed(ref=probe.ref)) == []
    [probe] = [e for e in one.do(BusResumed()) if isinstance(e, LoadHeads)]
    assert one.do(HeadsLoaded(ref=probe.ref, heads={"elsewhere": (5, "e1")})) == []


def test_a_head_of_an_old_life_is_stale() -> None:
    one = One()
    one.open(1, "ann")
    # A message of another life from the bus: the log is asked which life is now.
    [ask] = [
        e for e in one.do(Appended(message=message(1, epoch="e2"))) if isinstance(e, LoadHeads)
    ]
    assert one.do(Appended(message=message(2, epoch="e2"))) == []  # (asked once)
    out = one.do(HeadsLoaded(ref=ask.ref, heads={"general": (2, "e2")}))
    assert [e.after for e in out if type(e).__name__ == "LoadHistory"] == [0]
    assert one.engine.rooms()["general"].epoch == "e2"
    [probe] = [e for e in one.do(BusResumed()) if isinstance(e, LoadHeads)]
    assert one.do(HeadsLoaded(ref=probe.ref, heads={"general": (9, "e1")})) == []
    assert one.do(Appended(message=message(7, epoch="e1"))) == []  # late, from the old life
    [ask] = [
        e for e in one.do(Appended(message=message(1, epoch="e3"))) if isinstance(e, LoadHeads)
    ]
    one.do(HeadsFailed(ref=ask.ref))


def test_facts_for_rooms_not_held_and_unknown_members_are_ignored() -> None:
    one = One()
    one.open(1, "ann")
    assert one.do(Shared(origin="p2", room="other", fact=MemberArrived(user="x"))) == []
    assert one.do(Shared(origin="p2", room="general", fact=MemberDeparted(user="x"))) == []
    assert one.do(Shared(origin="p2", room="general", fact=ReadMarked(user="x", offset=0))) == []


def test_a_holder_answers_who_is_here() -> None:
    one = One()
    one.open(1, "ann")
    out = one.do(Shared(origin="p2", room="general", fact=MembersAsked()))
    assert out == [Share(room="general", fact=MembersTold(users=("ann",), seq=2))]


def test_remote_members_are_bounded() -> None:
    one = One(Config(cluster=True, max_remote_members=2))
    one.open(1, "ann")
    told = MembersTold(users=("u1", "u2", "u3", "u4"))
    one.do(Shared(origin="p2", room="general", fact=told))
    assert one.engine.members("general") == ("ann", "u1", "u2")
    one.do(ProcessGone(origin="p2"))
    one.do(ProcessGone(origin="p2"))
    assert one.engine.members("general") == ("ann",)


def test_frames_sent_during_a_claim_wait_and_then_run() -> None:
    one = One()
    out = one.do(Connect(conn=1, user="ann", resume="tok", offsets={"general": 0}))
    [claim] = [e for e in out if isinstance(e, ClaimSession)]
    assert claim.user == "ann"
    with pytest.raises(LocalProtocolError):
        one.do(Connect(conn=1, user="ann", resume="tok"))
    one.do(Receive(conn=1, text='{"type":"typing","room":"general"}'))
    claimed = SessionClaimed(
        ref=claim.ref,
        id="sid",
        token="tok",
        user="ann",
        rooms=(ParkedRoom(room="general", offset=0, epoch="e1"),),
    )
    out = one.do(claimed)
    assert any(isinstance(e, LoadRoom) for e in out)
    one.do(RoomLoaded(room="general", epoch="e1", head=0))
    assert one.engine.session("sid") is not None
    assert one.do(claimed) == []  # answered already


def test_a_connection_gone_during_its_claim_leaves_the_session_parked() -> None:
    one = One()
    [claim] = [
        e for e in one.do(Connect(conn=1, user="ann", resume="tok")) if isinstance(e, ClaimSession)
    ]
    one.do(Disconnected(conn=1))
    rooms = (ParkedRoom(room="general", offset=3, epoch="e1"),)
    out = one.do(SessionClaimed(ref=claim.ref, id="sid", token="tok", user="ann", rooms=rooms))
    # Ours now, away: kept here for its grace period, parked with the rooms it had.
    [parked] = [e for e in out if isinstance(e, SessionParked)]
    assert (parked.rooms, parked.moves) == (rooms, 1)
    assert one.engine.session("sid") is not None
    [claim] = [
        e for e in one.do(Connect(conn=2, user="ann", resume="tok2")) if isinstance(e, ClaimSession)
    ]
    one.do(Disconnected(conn=2))
    assert one.do(ClaimRefused(ref=claim.ref)) == []


def test_a_claim_answered_for_another_user_is_a_fresh_session() -> None:
    one = One()
    [claim] = [
        e for e in one.do(Connect(conn=1, user="ann", resume="tok")) if isinstance(e, ClaimSession)
    ]
    one.do(SessionClaimed(ref=claim.ref, id="sid", token="tok", user="mallory"))
    assert one.engine.session("sid") is None
    assert [s.user for s in one.engine.sessions()] == ["ann"]


def test_taking_a_session_that_is_not_here_does_nothing() -> None:
    one = One()
    assert one.do(SessionTaken(token="nope", by="p2")) == []


# -- through the simulator ----------------------------------------------------------------


def test_a_live_connection_whose_session_is_claimed_elsewhere_is_closed() -> None:
    cluster = Cluster(2)
    ann = cluster.connect(0, "ann", "general")
    bo = cluster.connect(1, "bo", "general")
    cluster.advance(0.1)
    old = cluster.nodes[0]
    token = ann.token
    assert token is not None
    cluster.records[token] = (old, parked_record(_parked(ann.session or "", token)), 1e12)
    twin = cluster.connect(1, "ann", "general")
    twin.token = token
    cluster.move(twin, 1)
    cluster.advance(0.1)
    assert ann.closed == (1000, "session resumed elsewhere")
    assert twin.of_type("welcome")[-1]["resumed"] is True
    assert not [e for e in bo.events if e["type"] == "left"]


def _parked(sid: str, token: str) -> SessionParked:
    return SessionParked(
        token=token,
        id=sid,
        user="ann",
        rooms=(ParkedRoom(room="general", offset=0, epoch="m1"),),
        until=1e12,
    )


def test_a_message_for_a_room_still_loading_is_merged_by_offset() -> None:
    one = One()
    out = one.do(Connect(conn=1, user="ann", rooms=("general",)))
    assert RoomHeld(room="general") in out  # subscribed before the load reads
    one.do(Appended(message=message(3)))
    # Confirmed while loading: the load may have read the head before, so the room
    # asks the log once it arrived.
    assert one.do(Subscribed(rooms=("general",))) == []
    one.do(Appended(message=message(2)))
    out = one.do(RoomLoaded(room="general", epoch="e1", head=1))
    assert one.engine.rooms()["general"].head == 3
    assert [e.rooms for e in out if isinstance(e, LoadHeads)] == [("general",)]


def test_a_direct_message_for_nobody_here_is_ignored() -> None:
    one = One()
    assert one.do(Appended(message=message(1, room="dm:x:y"))) == []


def _appends(out: list[Any]) -> list[Any]:
    return [e for e in out if type(e).__name__ == "Append"]


def test_a_retry_of_a_message_held_for_a_gap_is_acked_once_in_its_place() -> None:
    from chatcore import HistoryLoaded, LoadHistory, Send

    one = One()
    one.open(1, "ann")
    [first] = _appends(one.do(Send(conn=1, room="general", text="hi", client_id="c1")))
    [retry] = _appends(one.do(Send(conn=1, room="general", text="hi", client_id="c1")))
    mine = Message(room="general", offset=3, epoch="e1", sender="ann", text="hi", ts=1)
    out = one.do(Appended(message=mine, ref=first.ref))
    [gap] = [e for e in out if isinstance(e, LoadHistory)]
    assert one.do(Appended(message=mine, ref=retry.ref, duplicate=True)) == []
    out = one.do(HistoryLoaded(ref=gap.ref, messages=(message(1), message(2))))
    acks = [e.event for e in out if type(e.event).__name__ == "Ack"]
    assert [a.offset for a in acks] == [3]


def test_an_early_message_the_log_skipped_over_still_gets_its_ack() -> None:
    from chatcore import HistoryLoaded, LoadHistory, Send

    one = One()
    one.open(1, "ann")
    [send] = _appends(one.do(Send(conn=1, room="general", text="hi", client_id="c1")))
    mine = Message(room="general", offset=2, epoch="e1", sender="ann", text="hi", ts=1)
    [gap] = [e for e in one.do(Appended(message=mine, ref=send.ref)) if isinstance(e, LoadHistory)]
    out = one.do(HistoryLoaded(ref=gap.ref, messages=(message(1), message(3))))
    acks = [e.event for e in out if type(e.event).__name__ == "Ack"]
    assert [a.offset for a in acks] == [2]


def test_an_answer_from_a_life_the_room_left_is_only_acked() -> None:
    from chatcore import Send

    one = One(Config())
    one.open(1, "ann")
    [send] = _appends(one.do(Send(conn=1, room="general", text="hi", client_id="c1")))
    one.do(Appended(message=message(1, epoch="e2")))
    old = Message(room="general", offset=1, epoch="e1", sender="ann", text="hi", ts=1)
    out = one.do(Appended(message=old, ref=send.ref))
    assert [type(e.event).__name__ for e in out] == ["Ack"]


def test_many_new_lives_keep_a_bounded_past() -> None:
    one = One(Config())
    one.open(1, "ann")
    for life in range(2, 20):
        one.do(Appended(message=message(1, epoch=f"e{life}")))
    room = one.engine.rooms()["general"]
    assert room.epoch == "e19"
    assert room.head == 1


def test_a_reader_replaying_when_the_room_starts_a_new_life_starts_over_with_it() -> None:
    one = One(Config(outbox_frames=8))
    one.open(1, "ann")
    for offset in range(1, 10):  # nothing is reported written: ann falls behind
        one.do(Appended(message=message(offset)))
    from chatcore import Drained

    one.do(Appended(message=message(1, epoch="e2")))
    out = one.do(Drained(conns=(1,)))
    texts = [(e.event.offset, e.event.epoch) for e in out if type(e.event).__name__ == "Message"]
    assert texts == [(1, "e2")]


def test_a_resume_ahead_of_a_process_that_the_log_cannot_serve_stops_asking() -> None:
    from chatcore import HistoryLoaded, LoadHistory

    one = One()
    one.open(1, "ann")
    one.do(Disconnected(conn=1))
    [parked] = one.of(SessionParked)
    out = one.do(Connect(conn=2, user="ann", resume=parked.token, offsets={"general": 5}))
    [gap] = [e for e in out if isinstance(e, LoadHistory)]
    assert (gap.after, gap.before) == (0, 6)
    assert one.do(HistoryLoaded(ref=gap.ref, messages=())) == []
    out = one.do(Appended(message=message(1)))
    assert not [e for e in out if type(e).__name__ == "LoadHistory"]  # it stopped asking
    assert not [e for e in out if type(e).__name__ == "Deliver"]  # ann saw up to 5


def test_a_load_that_fails_forgets_what_came_for_the_room() -> None:
    from chatcore import RoomLoadFailed

    one = One()
    one.do(Connect(conn=1, user="ann", rooms=("general",)))
    one.do(Appended(message=message(1)))
    out = one.do(RoomLoadFailed(room="general"))
    assert RoomReleased(room="general") in out
    assert one.engine._st.peers.loading == {}
