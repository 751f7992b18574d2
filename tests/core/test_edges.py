"""The engine driven directly, as an embedding program or a store adapter would.

These cover what the simulator's well-behaved store never does: a log that
fails, answers late or twice, loses history, or hears of messages from other
processes; and requests passed as typed commands instead of JSON frames.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from chatcore import (
    Append,
    Appended,
    AppendFailed,
    Close,
    CloseCode,
    Config,
    Connect,
    Deliver,
    Disconnected,
    Effect,
    Engine,
    FetchHistory,
    HandshakeError,
    HistoryFailed,
    HistoryLoaded,
    InboxFailed,
    InboxLoaded,
    Join,
    LoadHistory,
    LoadInbox,
    LoadRoom,
    LocalProtocolError,
    MarkRead,
    Message,
    Mode,
    Ping,
    Pong,
    RandomIds,
    Receive,
    RoomLoaded,
    RoomLoadFailed,
    SavePositions,
    SeededIds,
    Send,
    SendDirect,
    StartTyping,
    Written,
    WrittenMany,
    dm_room,
    dm_users,
    encode_text,
    format_ts,
    is_valid_room,
    parse_connect,
    select_mode,
)


def msg(
    room: str,
    offset: int,
    text: str = "",
    epoch: str = "e1",
    sender: str = "zed",
    client_id: str | None = None,
) -> Message:
    return Message(
        room=room,
        offset=offset,
        epoch=epoch,
        sender=sender,
        text=text or f"t{offset}",
        ts=1_700_000_000_000,
        client_id=client_id,
    )


class Host:
    """An engine whose storage effects the test answers by hand."""

    def __init__(self, config: Config | None = None) -> None:
        self.engine = Engine(config or Config(), SeededIds(9))
        self.now = 1000.0
        self.storage: list[Effect] = []
        self.frames: dict[int, list[Any]] = {}
        self.closed: dict[int, tuple[int, str]] = {}
        self.pings: list[int] = []
        self.auto_write = True
        self.auto_inbox = True  # answer LoadInbox with an empty inbox at once

    def do(self, command: Any) -> None:
        self.run(self.engine.handle(command, self.now))

    def run(self, effects: list[Effect]) -> None:
        written: list[tuple[int, int, int]] = []
        inboxes: list[LoadInbox] = []
        for effect in effects:
            if isinstance(effect, Deliver):
                for conn in effect.to:
                    frame = json.loads(effect.data) if effect.data.startswith("{") else effect.data
                    self.frames.setdefault(conn, []).append(frame)
                    written.append((conn, 1, effect.size))
            elif isinstance(effect, Close):
                self.closed[effect.conn] = (effect.code, effect.reason)
            elif isinstance(effect, Ping):
                self.pings.append(effect.conn)
            elif isinstance(effect, LoadInbox) and self.auto_inbox:
                inboxes.append(effect)
            else:
                self.storage.append(effect)
        if written and self.auto_write:
            self.do(WrittenMany(reports=tuple(written)))
        for inbox in inboxes:
            self.do(InboxLoaded(ref=inbox.ref, rooms=()))

    def take_storage(self, kind: type) -> Any:
        for i, effect in enumerate(self.storage):
            if isinstance(effect, kind):
                return self.storage.pop(i)
        raise AssertionError(f"no {kind.__name__} in {self.storage}")

    def open_room(
        self,
        room: str,
        head: int = 0,
        recent: tuple[Message, ...] = (),
        epoch: str = "e1",
        **kw: Any,
    ) -> None:
        load = self.take_storage(LoadRoom)
        assert load.room == room
        self.do(RoomLoaded(room=room, epoch=epoch, head=head, recent=recent, **kw))

    def connect(self, conn: int, user: str, *rooms: str, **kw: Any) -> None:
        self.do(Connect(conn=conn, user=user, rooms=rooms, **kw))

    def last(self, conn: int) -> Any:
        return self.frames[conn][-1]

    def kinds(self, conn: int) -> list[str]:
        return [f["type"] for f in self.frames.get(conn, [])]


def test_typed_requests_work_without_json() -> None:
    h = Host()
    h.connect(1, "alice", "general")
    h.open_room("general")
    h.connect(2, "bob", "general")
    h.do(Send(conn=1, room="general", text="typed", client_id="c"))
    append = h.take_storage(Append)
    assert (append.sender, append.text, append.client_id) == ("alice", "typed", "c")
    h.do(
        Appended(message=msg("general", 1, "typed", sender="alice", client_id="c"), ref=append.ref)
    )
    assert h.last(2)["text"] == "typed"
    assert h.last(1) == {"type": "ack", "room": "general", "offset": 1, "epoch": "e1", "id": "c"}
    h.do(StartTyping(conn=2, room="general"))
    h.do(MarkRead(conn=2, room="general", offset=1))
    assert h.kinds(1)[-2:] == ["typing", "read"]
    assert isinstance(h.storage[-1], SavePositions)


def test_direct_send_rejects_surrogates_and_empty_text() -> None:
    h = Host()
    h.connect(1, "alice", "general")
    h.open_room("general")
    h.do(Send(conn=1, room="general", text="\ud800"))
    h.do(Send(conn=1, room="general", text=""))
    assert [f["code"] for f in h.frames[1][-2:]] == ["invalid_field", "invalid_field"]


def test_commands_for_closed_connections_are_ignored() -> None:
    h = Host()
    h.connect(1, "alice")
    h.do(Disconnected(conn=1))
    for command in (
        Receive(conn=1, text="{}"),
        Send(conn=1, room="general", text="x"),
        Written(conn=1, frames=1, nbytes=1),
        Pong(conn=1),
        Disconnected(conn=1),
    ):
        h.do(command)
    assert h.engine.connections == 0
    with pytest.raises(LocalProtocolError):
        h.engine.outbox(1)


def test_negative_written_counts_are_misuse() -> None:
    h = Host()
    h.connect(1, "alice")
    with pytest.raises(LocalProtocolError):
        h.do(WrittenMany(reports=((1, 0, 0), (1, -1, 0))))


def test_room_load_failure_fails_joins_and_connects_but_not_the_rest() -> None:
    h = Host()
    h.connect(1, "alice", "general", "broken")
    h.open_room("general")
    h.do(RoomLoadFailed(room="broken"))
    welcome = h.frames[1][0]
    assert welcome["type"] == "welcome"
    assert set(welcome["rooms"]) == {"general"}
    assert h.frames[1][1]["code"] == "unavailable"
    h.do(Join(conn=1, room="broken"))
    h.do(RoomLoadFailed(room="broken", reason="disk on fire"))
    assert h.last(1)["code"] == "unavailable"
    assert "disk on fire" in h.last(1)["message"]
    h.do(Join(conn=1, room="broken"))  # a later join asks the log again
    h.open_room("broken")
    assert h.last(1)["type"] == "members"


def test_a_room_answer_nobody_waits_for_is_ignored() -> None:
    h = Host()
    h.do(RoomLoaded(room="general", epoch="e1", head=5))
    h.do(RoomLoadFailed(room="general"))
    assert h.engine.rooms() == {}


def test_append_failure_tells_the_sender_only() -> None:
    h = Host()
    h.connect(1, "alice", "general")
    h.open_room("general")
    h.connect(2, "bob", "general")
    h.do(Send(conn=1, room="general", text="x", client_id="k"))
    append = h.take_storage(Append)
    h.do(AppendFailed(ref=append.ref))
    assert h.last(1)["code"] == "unavailable"
    assert h.last(1)["ref"] == "k"
    assert "message" not in h.kinds(2)
    h.do(AppendFailed(ref=append.ref))  # a second answer for the same ref is ignored
    assert h.kinds(1).count("error") == 1


def test_an_ack_for_a_sender_that_dropped_is_not_sent_but_others_get_the_message() -> None:
    h = Host()
    h.connect(1, "alice", "general")
    h.open_room("general")
    h.connect(2, "bob", "general")
    h.do(Send(conn=1, room="general", text="x"))
    append = h.take_storage(Append)
    h.do(Disconnected(conn=1))
    h.do(Appended(message=msg("general", 1, sender="alice"), ref=append.ref))
    assert h.last(2)["offset"] == 1
    assert "ack" not in h.kinds(1)


def test_a_message_for_a_room_not_held_here_is_only_acked() -> None:
    h = Host()
    h.connect(1, "alice", "general")
    h.open_room("general")
    h.do(Send(conn=1, room="general", text="x"))
    append = h.take_storage(Append)
    h.do(Disconnected(conn=1))  # session detached: room still held
    h.do(Appended(message=msg("elsewhere", 3)))  # not held: nothing to do
    assert "elsewhere" not in h.engine.rooms()
    h.do(Appended(message=msg("general", 1, sender="alice"), ref=append.ref))
    assert h.engine.rooms()["general"].head == 1


def test_duplicate_answer_for_an_old_offset_acks_without_broadcast() -> None:
    h = Host()
    h.connect(1, "alice", "general")
    h.open_room("general", head=4, recent=tuple(msg("general", i) for i in range(1, 5)))
    h.connect(2, "bob", "general")
    h.do(Send(conn=1, room="general", text="again", client_id="r"))
    append = h.take_storage(Append)
    h.do(Appended(message=msg("general", 3), ref=append.ref))  # the log says: offset 3 already
    assert h.last(1) == {"type": "ack", "room": "general", "offset": 3, "epoch": "e1", "id": "r"}
    assert "message" not in h.kinds(2)


def test_an_ack_names_the_new_life_when_the_log_restarted_the_room() -> None:
    """The log lost the room and numbers it afresh: the sender's own ack is the first
    it hears of that, so the ack carries the new epoch (its offset counts there)."""
    h = Host()
    h.connect(1, "alice", "general")
    h.open_room("general", head=4, recent=tuple(msg("general", i) for i in range(1, 5)))
    h.do(Send(conn=1, room="general", text="after the loss", client_id="n"))
    append = h.take_storage(Append)
    h.do(Appended(message=msg("general", 1, epoch="e2", sender="alice"), ref=append.ref))
    assert h.last(1) == {"type": "ack", "room": "general", "offset": 1, "epoch": "e2", "id": "n"}


def test_a_gap_the_log_cannot_fill_is_skipped_and_later_messages_flow() -> None:
    h = Host()
    h.connect(2, "bob", "general")
    h.open_room("general")
    h.do(Appended(message=msg("general", 3)))
    gap = h.take_storage(LoadHistory)
    assert (gap.after, gap.before) == (0, 3)
    h.do(Appended(message=msg("general", 5)))  # one gap request at a time
    assert not [e for e in h.storage if isinstance(e, LoadHistory)]
    h.do(HistoryLoaded(ref=gap.ref, messages=(msg("general", 1),)))
    assert [f["offset"] for f in h.frames[2] if f["type"] == "message"] == [1, 3]
    h.do(Appended(message=msg("general", 4)))
    assert [f["offset"] for f in h.frames[2] if f["type"] == "message"] == [1, 3, 4, 5]


def test_a_failed_gap_fill_is_asked_again_on_the_next_early_message() -> None:
    h = Host()
    h.connect(2, "bob", "general")
    h.open_room("general")
    h.do(Appended(message=msg("general", 2)))
    gap = h.take_storage(LoadHistory)
    h.do(HistoryFailed(ref=gap.ref))
    h.do(Appended(message=msg("general", 3)))
    again = h.take_storage(LoadHistory)
    h.do(HistoryLoaded(ref=again.ref, messages=(msg("general", 1),)))
    assert [f["offset"] for f in h.frames[2] if f["type"] == "message"] == [1, 2, 3]


def test_a_new_epoch_means_the_log_restarted_and_delivery_follows_it() -> None:
    h = Host()
    h.connect(2, "bob", "general")
    h.open_room("general", head=7)
    h.do(Appended(message=msg("general", 1, epoch="e2")))
    assert h.last(2)["epoch"] == "e2"
    assert h.last(2)["offset"] == 1
    assert h.engine.rooms()["general"].epoch == "e2"


def test_history_from_the_log_and_its_failures() -> None:
    h = Host(Config(history_window=2))
    h.connect(1, "alice", "general")
    h.open_room("general", head=10, recent=(msg("general", 9), msg("general", 10)))
    h.do(FetchHistory(conn=1, room="general", before=9, limit=3))
    load = h.take_storage(LoadHistory)
    assert (load.after, load.before, load.limit) == (0, 9, 3)
    h.do(
        HistoryLoaded(
            ref=load.ref, messages=(msg("general", 6), msg("general", 7), msg("general", 8))
        )
    )
    assert [m["offset"] for m in h.last(1)["messages"]] == [6, 7, 8]
    assert h.last(1)["more"] is True
    h.do(FetchHistory(conn=1, room="general", before=3))
    load = h.take_storage(LoadHistory)
    h.do(HistoryFailed(ref=load.ref, reason="timeout"))
    assert h.last(1)["code"] == "unavailable"
    h.do(FetchHistory(conn=1, room="general", before=3))
    load = h.take_storage(LoadHistory)
    h.do(Disconnected(conn=1))
    h.do(HistoryLoaded(ref=load.ref, messages=()))  # asker gone: nothing to send


def test_history_of_a_room_nobody_is_in_loads_it_and_lets_it_go() -> None:
    h = Host()
    h.connect(1, "alice")
    h.do(FetchHistory(conn=1, room="archive"))
    h.open_room("archive", head=2, recent=(msg("archive", 1), msg("archive", 2)))
    assert [m["offset"] for m in h.last(1)["messages"]] == [1, 2]
    assert "archive" not in h.engine.rooms()
    h.do(FetchHistory(conn=1, room="bad name"))
    assert h.last(1)["code"] == "invalid_name"


def test_resume_whose_replay_the_log_cannot_serve_is_closed_to_try_again() -> None:
    h = Host(Config(history_window=2))
    h.connect(1, "alice", "general")
    h.open_room("general", head=10, recent=(msg("general", 9), msg("general", 10)))
    token = h.frames[1][0]["resume"]
    h.do(Disconnected(conn=1))
    h.connect(2, "alice", resume=token, offsets={"general": 5})
    load = h.take_storage(LoadHistory)
    assert (load.after, load.before) == (5, 9)
    h.do(HistoryFailed(ref=load.ref))
    assert h.closed[2] == (CloseCode.TRY_AGAIN_LATER, "history unavailable")
    h.connect(3, "alice", resume=token, offsets={"general": 5})
    load = h.take_storage(LoadHistory)
    # Retention removed 6 and 7: the replay goes on from what the log still has.
    h.do(HistoryLoaded(ref=load.ref, messages=(msg("general", 8),)))
    assert [f["offset"] for f in h.frames[3] if f["type"] == "message"] == [8, 9, 10]


def test_resume_when_the_log_lost_everything_before_the_window() -> None:
    h = Host(Config(history_window=2))
    h.connect(1, "alice", "general")
    h.open_room("general", head=10, recent=(msg("general", 9), msg("general", 10)))
    token = h.frames[1][0]["resume"]
    h.do(Disconnected(conn=1))
    h.connect(2, "alice", resume=token, offsets={"general": 3})
    load = h.take_storage(LoadHistory)
    h.do(Disconnected(conn=2))
    h.do(HistoryLoaded(ref=load.ref, messages=()))  # late answer for a gone connection
    h.connect(3, "alice", resume=token, offsets={"general": 3})
    load = h.take_storage(LoadHistory)
    h.do(HistoryLoaded(ref=load.ref, messages=()))
    assert [f["offset"] for f in h.frames[3] if f["type"] == "message"] == [9, 10]


def test_a_tiny_outbox_closes_even_the_welcome_as_slow() -> None:
    h = Host(Config(outbox_frames=2))
    h.auto_write = False
    h.connect(1, "alice", "a", "b", "c")
    for room in ("a", "b", "c"):
        h.open_room(room)
    assert h.closed[1] == (1013, "slow consumer")


def test_pings_are_sent_and_answers_keep_the_connection() -> None:
    h = Host(Config(ping_interval=25, pong_timeout=20))
    h.connect(1, "alice")
    assert h.engine.next_deadline() == h.now + 25
    h.now += 25
    h.run(h.engine.tick(h.now))
    assert h.pings == [1]
    h.now += 1
    h.do(Pong(conn=1))
    h.now += 19
    h.run(h.engine.tick(h.now))
    assert 1 not in h.closed
    assert h.engine.next_deadline() == h.now - 20 + 25


def test_text_mode_delivers_lines_and_skips_json_only_events() -> None:
    h = Host()
    h.connect(1, "bob", "general", mode=Mode.TEXT)
    h.open_room("general")
    h.connect(2, "alice", "general")
    h.do(StartTyping(conn=2, room="general"))
    h.do(FetchHistory(conn=1, room="general"))
    assert h.frames[1] == ["In the room: bob", "alice joined the room"]


def test_text_lines_for_history_and_errors() -> None:
    from chatcore import ErrorEvent, History

    page = History(room="r", messages=(msg("r", 1, "a", sender="x"), msg("r", 2, "b")), more=False)
    assert encode_text(page) == "x: a\nzed: b"
    assert encode_text(ErrorEvent(code="forbidden", message="no")) == "error: no"


def test_direct_message_to_a_detached_recipient_waits_for_their_resume() -> None:
    h = Host()
    h.connect(1, "alice")
    h.connect(2, "bob")
    token = h.frames[2][0]["resume"]
    h.do(Disconnected(conn=2))
    h.do(SendDirect(conn=1, to="bob", text="while you were out"))
    room = dm_room("alice", "bob")
    h.open_room(room)
    append = h.take_storage(Append)
    h.do(Appended(message=msg(room, 1, "while you were out", sender="alice"), ref=append.ref))
    h.connect(3, "bob", resume=token)
    assert [f["text"] for f in h.frames[3] if f["type"] == "message"] == ["while you were out"]


def test_handshake_query_parsing() -> None:
    c = parse_connect(7, "user=al&room=general&room=tech&resume=tok&offset=general:41", Mode.JSON)
    assert (c.conn, c.user, c.rooms, c.resume, dict(c.offsets)) == (
        7,
        "al",
        ("general", "tech"),
        "tok",
        {"general": 41},
    )
    assert parse_connect(1, "user=x", Mode.TEXT, user="authed").user == "authed"
    assert parse_connect(1, "user=x&offset=dm:a:b:3", Mode.JSON).offsets == {"dm:a:b": 3}
    for query, status in [
        ("room=general", 400),
        ("user=bad name", 400),
        ("user=a&room=no!", 400),
        ("user=a&offset=general", 400),
        ("user=a&offset=general:x", 400),
        ("user=a&" + "x" * 9000, 414),
        ("user=a" + "&room=r" * 300, 400),
    ]:
        with pytest.raises(HandshakeError) as info:
            parse_connect(1, query, Mode.JSON)
        assert info.value.status == status
    assert select_mode(["chatcore.v1", "other"]) == (Mode.JSON, "chatcore.v1")
    assert select_mode([]) == (Mode.TEXT, None)


def test_names_config_and_ids() -> None:
    assert dm_users("dm:alice:bob") == ("alice", "bob")
    assert dm_users("dm:bob:alice") is None  # not canonical
    assert not is_valid_room("dm:bob:alice")
    with pytest.raises(ValueError, match="invalid user name"):
        dm_room("al ice", "bob")
    with pytest.raises(ValueError, match="positive"):
        Config(grace_period=0)
    with pytest.raises(ValueError, match="max_frame_bytes"):
        Config(max_text_bytes=100, max_frame_bytes=50)
    ids = RandomIds(lambda n: bytes(range(n)))
    assert ids.session_id() == "AAECAwQFBgcI"
    assert len(ids.resume_token()) == 32
    assert format_ts(1_763_762_400_007) == "2025-11-21T22:00:00.007Z"


def test_create_room_misuse_raises() -> None:
    from chatcore import CreateRoom

    h = Host()
    with pytest.raises(LocalProtocolError):
        h.do(CreateRoom(room="dm:a:b"))
    with pytest.raises(LocalProtocolError):
        h.do(CreateRoom(room="staff", allow=frozenset({"ok", "not ok"})))
    assert h.storage == []


def test_bad_room_names_in_a_typed_connect_or_leave_are_errors_not_crashes() -> None:
    h = Host()
    h.connect(1, "alice", "general", "no way!", "general")
    h.open_room("general")
    assert set(h.frames[1][0]["rooms"]) == {"general"}
    assert [f["code"] for f in h.frames[1] if f["type"] == "error"] == ["invalid_name"]
    h.do(Receive(conn=1, text='{"type":"leave","room":"no way!"}'))
    assert h.last(1)["code"] == "invalid_name"


def test_every_text_mode_reader_gets_the_line_once_encoded() -> None:
    h = Host()
    h.connect(1, "bob", "general", mode=Mode.TEXT)
    h.open_room("general")
    h.connect(2, "carol", "general", mode=Mode.TEXT)
    h.connect(3, "alice", "general")
    h.do(StartTyping(conn=3, room="general"))
    h.do(Send(conn=3, room="general", text="hi"))
    append = h.take_storage(Append)
    h.do(Appended(message=msg("general", 1, "hi", sender="alice"), ref=append.ref))
    assert h.frames[1][-1] == h.frames[2][-1] == "alice: hi"


def test_making_a_room_private_keeps_allowed_users_and_other_tabs_elsewhere() -> None:
    from chatcore import CreateRoom

    h = Host()
    h.connect(1, "alice", "general")
    h.open_room("general")
    h.connect(2, "bob", "general")
    h.connect(3, "bob")  # bob's second tab is not in the room
    h.do(CreateRoom(room="general", allow=frozenset({"alice"})))
    assert h.engine.members("general") == ("alice",)
    assert h.last(2)["code"] == "forbidden"
    assert 3 not in h.frames or all(f.get("code") != "forbidden" for f in h.frames[3])


def test_drained_frees_the_whole_outbox_and_resumes_a_paced_replay() -> None:
    from chatcore import Drained

    h = Host(Config(outbox_frames=4, history_window=100))
    h.auto_write = False
    h.connect(1, "alice", "general")
    h.open_room("general", head=9, recent=tuple(msg("general", i) for i in range(1, 10)))
    token = h.frames[1][0]["resume"]
    h.do(Drained(conns=(1,)))
    h.do(Disconnected(conn=1))
    h.connect(2, "alice", resume=token, offsets={"general": 0})
    replayed = [f["offset"] for f in h.frames[2] if f["type"] == "message"]
    assert replayed == []  # welcome + members fill half the outbox: the replay waits
    for _ in range(6):
        h.do(Drained(conns=(2, 99)))  # 99: not open, ignored
    assert [f["offset"] for f in h.frames[2] if f["type"] == "message"] == list(range(1, 10))
    assert h.engine.outbox(2)[0] <= 2


def test_members_lists_follow_the_room_after_messages_and_joins() -> None:
    h = Host()
    h.connect(1, "alice", "general")
    h.open_room("general")
    h.connect(2, "bob", "general")
    h.do(Appended(message=msg("general", 1)))
    h.connect(3, "carol", "general")
    h.connect(4, "carol", "general")  # the same member list, encoded once
    lists = [
        (f["users"], f["offset"]) for c in (2, 3, 4) for f in h.frames[c] if f["type"] == "members"
    ]
    assert lists == [
        (["alice", "bob"], 0),
        (["alice", "bob", "carol"], 1),
        (["alice", "bob", "carol"], 1),
    ]


def test_follow_offsets_keeps_what_a_client_needs_to_resume() -> None:
    from chatcore import follow_offsets

    offsets: dict[str, int] = {"old": 9}
    welcome = {"type": "welcome", "resumed": False, "rooms": {"general": {"offset": 4}}}
    follow_offsets(offsets, "alice", welcome)
    assert offsets == {"general": 4}
    follow_offsets(offsets, "alice", {"type": "members", "room": "tech", "offset": 2})
    follow_offsets(offsets, "alice", {"type": "message", "room": "general", "offset": 5})
    follow_offsets(offsets, "alice", {"type": "ack", "room": "tech", "offset": 3})
    follow_offsets(offsets, "alice", {"type": "left", "room": "tech", "user": "bob"})
    assert offsets == {"general": 5, "tech": 3}
    follow_offsets(offsets, "alice", {"type": "left", "room": "tech", "user": "alice"})
    follow_offsets(
        offsets, "alice", {"type": "welcome", "resumed": True, "rooms": {"general": {"offset": 5}}}
    )
    assert offsets == {"general": 5}


def test_the_inbox_answer_adds_only_the_users_own_direct_rooms() -> None:
    h = Host(Config(max_rooms_per_session=3))
    h.auto_inbox = False
    h.connect(1, "bob", "general")
    inbox = h.take_storage(LoadInbox)
    assert (inbox.user, inbox.limit) == ("bob", 2)  # 3 rooms, one asked for
    h.open_room("general")
    assert h.frames.get(1) is None  # the welcome waits for the inbox
    # A log answering for other rooms (or twice) cannot put bob anywhere else.
    rooms = ("dm:carol:dave", "general2", "dm:alice:bob", "dm:bob:carol", "dm:bob:dave")
    h.do(InboxLoaded(ref=inbox.ref, rooms=rooms))
    h.do(InboxLoaded(ref=inbox.ref, rooms=("dm:bob:eve",)))
    h.open_room("dm:alice:bob")
    assert h.frames.get(1) is None
    h.open_room("dm:bob:carol")
    assert list(h.frames[1][0]["rooms"]) == ["general", "dm:alice:bob", "dm:bob:carol"]
    assert h.storage == []  # dm:bob:dave is past the room limit; nothing else asked


def test_a_failed_inbox_still_welcomes_and_a_dropped_session_forgets_it() -> None:
    h = Host()
    h.auto_inbox = False
    h.connect(1, "bob")
    h.do(InboxFailed(ref=h.take_storage(LoadInbox).ref))
    assert h.kinds(1) == ["welcome"]
    h.connect(2, "carol")
    inbox = h.take_storage(LoadInbox)
    h.do(Disconnected(conn=2))
    assert h.engine.stats()["pending_loads"] == 0
    h.do(InboxLoaded(ref=inbox.ref, rooms=("dm:bob:carol",)))  # too late: ignored
    assert h.storage == []
    assert h.engine.stats()["sessions"] == 1
