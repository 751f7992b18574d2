"""Chat behaviour as a user sees it, driven through the simulator and the real codec."""

from __future__ import annotations

import pytest

from chatcore import Config, Mode, dm_room
from chatcore_sim import Simulation


def types(events: list[dict[str, object]]) -> list[object]:
    return [e["type"] for e in events]


def test_welcome_then_members_then_messages_in_order() -> None:
    sim = Simulation(seed=1)
    alice = sim.connect("alice", room="general")
    bob = sim.connect("bob", room="general")
    welcome, members = bob.take()
    assert welcome["type"] == "welcome"
    assert welcome["user"] == "bob"
    assert welcome["resumed"] is False
    assert welcome["rooms"] == {"general": {"offset": 0, "epoch": "m1", "read": 0}}
    assert members == {
        "type": "members",
        "room": "general",
        "users": ["alice", "bob"],
        "offset": 0,
        "epoch": "m1",
    }
    assert alice.take()[-1] == {"type": "joined", "room": "general", "user": "bob"}

    alice.send("one")
    alice.send("two")
    assert [(m["offset"], m["from"], m["text"]) for m in bob.messages()] == [
        (1, "alice", "one"),
        (2, "alice", "two"),
    ]
    # The sender gets acks, not its own message back; an ack names the life of the
    # room's history its offset counts in, as a message does.
    epoch = bob.messages()[0]["epoch"]
    assert list(alice.take()) == [
        {"type": "ack", "room": "general", "offset": 1, "epoch": epoch, "id": None},
        {"type": "ack", "room": "general", "offset": 2, "epoch": epoch, "id": None},
    ]


def test_message_carries_server_time_in_utc_milliseconds() -> None:
    sim = Simulation(seed=1, start=1_763_762_400.123)  # 2025-11-21T22:00:00.123Z
    alice = sim.connect("alice", room="general")
    bob = sim.connect("bob", room="general")
    alice.send("hi")
    assert bob.messages()[0]["ts"] == "2025-11-21T22:00:00.123Z"


def test_echo_can_be_turned_on() -> None:
    sim = Simulation(Config(echo=True), seed=1)
    alice = sim.connect("alice", room="general")
    alice.send("hi", id="c1")
    assert types(alice.take()[-2:]) == ["ack", "message"]


def test_second_tab_of_the_sender_sees_the_message_and_presence_counts_users() -> None:
    sim = Simulation(seed=1)
    tab1 = sim.connect("alice", room="general")
    bob = sim.connect("bob", room="general")
    bob.take()
    tab2 = sim.connect("alice", room="general")
    assert bob.take() == []  # alice was already present: no second "joined"
    tab1.send("from tab 1")
    assert tab2.texts() == ["from tab 1"]
    assert bob.texts() == ["from tab 1"]
    assert tab1.texts() == []
    assert sim.engine.members("general") == ("alice", "bob")


def test_rooms_are_isolated() -> None:
    sim = Simulation(seed=1)
    alice = sim.connect("alice", room="general")
    bob = sim.connect("bob", room="general")
    carol = sim.connect("carol", room="tech")
    alice.send("for general")
    carol.send("for tech", room="tech")
    assert bob.texts() == ["for general"]
    assert carol.texts() == []
    assert alice.texts() == []


def test_retry_with_same_client_id_is_acked_with_the_original_offset_and_sent_once() -> None:
    sim = Simulation(seed=1)
    alice = sim.connect("alice", room="general")
    bob = sim.connect("bob", room="general")
    alice.send("once", id="m-1")
    alice.send("once", id="m-1")
    acks = alice.of_type("ack")
    assert [(a["offset"], a["id"]) for a in acks] == [(1, "m-1"), (1, "m-1")]
    assert bob.texts() == ["once"]
    # The same id from another user is another message.
    bob.send("mine", id="m-1")
    assert alice.texts() == ["mine"]


def test_retry_while_the_first_send_is_in_flight_is_not_broadcast_twice() -> None:
    sim = Simulation(seed=1, store_latency=0.5)
    alice = sim.connect("alice", room="general")
    sim.advance(1)
    bob = sim.connect("bob", room="general")
    sim.advance(1)
    alice.send("slow", id="x")
    alice.send("slow", id="x")
    assert alice.of_type("ack") == []  # nothing acked before the log answers
    sim.advance(1)
    assert [a["offset"] for a in alice.of_type("ack")] == [1, 1]
    assert bob.texts() == ["slow"]


def test_too_large_text_is_refused_and_others_see_nothing() -> None:
    sim = Simulation(Config(max_text_bytes=10, max_frame_bytes=200), seed=1)
    alice = sim.connect("alice", room="general")
    bob = sim.connect("bob", room="general")
    alice.send("é" * 6, id="big")  # 12 bytes of UTF-8
    assert alice.of_type("error")[-1]["code"] == "too_large"
    assert alice.of_type("error")[-1]["ref"] == "big"
    alice.send_raw("x" * 201)
    assert alice.of_type("error")[-1]["code"] == "too_large"
    alice.send("ok")
    assert bob.texts() == ["ok"]


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("not json", "invalid_json"),
        ("[1, 2]", "invalid_json"),
        ('{"room": "general"}', "unknown_type"),
        ('{"type": "shout", "room": "general"}', "unknown_type"),
        ('{"type": "send", "room": "general"}', "invalid_field"),
        ('{"type": "send", "room": 5, "text": "x"}', "invalid_field"),
        ('{"type": "send", "room": "general", "text": "x", "id": 7}', "invalid_field"),
        ('{"type": "send", "room": "general", "text": "\\ud800"}', "invalid_field"),
        ('{"type": "send", "room": "general", "text": ""}', "invalid_field"),
        ('{"type": "read", "room": "general", "offset": true}', "invalid_field"),
        ('{"type": "read", "room": "general", "offset": -1}', "invalid_field"),
        ('{"type": "history", "room": "general", "before": 0}', "invalid_field"),
        ('{"type": "join", "room": "bad room!"}', "invalid_name"),
        ('{"type": "join", "room": "dm:zed:amy"}', "invalid_name"),
        ('{"type": "send", "room": "elsewhere", "text": "x"}', "not_member"),
        ('{"type": "dm", "to": "no body", "text": "x"}', "invalid_name"),
        ("[" * 100_000, "invalid_json"),
    ],
)
def test_bad_frames_get_a_specific_error_and_the_connection_goes_on(frame: str, code: str) -> None:
    sim = Simulation(Config(max_frame_bytes=200_000), seed=1)
    alice = sim.connect("alice", room="general")
    bob = sim.connect("bob", room="general")
    alice.send_raw(frame)
    error = alice.of_type("error")[-1]
    assert error["code"] == code
    assert error["message"]
    assert alice.connected
    alice.send("still here")
    assert bob.texts() == ["still here"]


def test_rate_limit_refuses_with_retry_after_then_recovers_with_time() -> None:
    sim = Simulation(Config(rate_burst=3, rate_per_second=2.0), seed=1)
    alice = sim.connect("alice", room="general")
    bob = sim.connect("bob", room="general")
    for i in range(5):
        alice.send(f"m{i}")
    errors = alice.of_type("error")
    assert [e["code"] for e in errors] == ["rate_limited", "rate_limited"]
    assert errors[0]["retry_after"] == 0.5
    assert bob.texts() == ["m0", "m1", "m2"]
    sim.advance(0.5)
    alice.send("later")
    assert bob.texts()[-1] == "later"


def test_private_room_admits_only_its_allow_list() -> None:
    sim = Simulation(seed=1)
    sim.create_room("staff", allow=["alice"])
    alice = sim.connect("alice", room="staff")
    mallory = sim.connect("mallory", room="staff")
    assert mallory.of_type("welcome")[0]["rooms"] == {}
    assert mallory.of_type("error")[0]["code"] == "forbidden"
    mallory.join("staff")
    mallory.history("staff")
    alice.send("secret", room="staff")
    assert [e["code"] for e in mallory.of_type("error")] == ["forbidden"] * 3
    assert mallory.messages() == []
    assert sim.engine.members("staff") == ("alice",)
    assert "mallory" not in str(alice.events)


def test_making_a_room_private_removes_members_not_on_the_list() -> None:
    sim = Simulation(seed=1)
    alice = sim.connect("alice", room="general")
    bob = sim.connect("bob", room="general")
    sim.create_room("general", allow=["alice"])
    assert bob.of_type("error")[-1]["code"] == "forbidden"
    assert {"type": "left", "room": "general", "user": "bob"} in alice.events
    alice.send("now private")
    assert bob.texts() == []


def test_direct_messages_reach_every_session_of_the_recipient() -> None:
    sim = Simulation(seed=1)
    alice = sim.connect("alice", room="general")
    bob1 = sim.connect("bob")
    bob2 = sim.connect("bob")
    carol = sim.connect("carol", room="general")
    alice.dm("bob", "psst", id="d1")
    room = dm_room("alice", "bob")
    assert room == "dm:alice:bob"
    assert bob1.texts(room) == ["psst"]
    assert bob2.texts(room) == ["psst"]
    epoch = bob1.messages(room)[0]["epoch"]
    assert alice.of_type("ack")[-1] == {
        "type": "ack",
        "room": room,
        "offset": 1,
        "epoch": epoch,
        "id": "d1",
    }
    assert carol.messages() == []
    carol.join(room)
    assert carol.of_type("error")[-1]["code"] == "forbidden"
    bob1.send("hi back", room=room)
    assert alice.texts(room) == ["hi back"]


def test_a_direct_message_sent_while_away_is_waiting_when_the_recipient_comes() -> None:
    sim = Simulation(seed=1)
    alice = sim.connect("alice", room="general")
    alice.dm("bob", "are you there?")  # bob has never connected
    sim.advance(1)
    carol = sim.connect("carol")
    carol.dm("bob", "ping me")
    bob = sim.connect("bob", room="general")
    welcome = bob.of_type("welcome")[-1]
    # Newest conversation first, after the rooms bob asked for.
    assert list(welcome["rooms"]) == ["general", "dm:bob:carol", "dm:alice:bob"]
    assert welcome["rooms"]["dm:alice:bob"]["read"] == 0
    bob.history("dm:alice:bob")
    assert [m["text"] for m in bob.of_type("history")[-1]["messages"]] == ["are you there?"]
    alice.dm("bob", "great")  # bob is in the room now: live
    assert bob.texts("dm:alice:bob") == ["great"]
    bob.read(2, "dm:alice:bob")
    sim.close(bob)
    bob = sim.connect("bob")  # a new session: only the conversation with something unread
    assert list(bob.of_type("welcome")[-1]["rooms"]) == ["dm:bob:carol"]


def test_the_inbox_respects_the_room_limit_and_can_be_turned_off() -> None:
    sim = Simulation(Config(max_rooms_per_session=2), seed=1)
    for sender in ("alice", "carol", "dave"):
        sim.connect(sender).dm("bob", f"from {sender}")
        sim.advance(1)
    bob = sim.connect("bob", room="general")
    assert list(bob.of_type("welcome")[-1]["rooms"]) == ["general", "dm:bob:dave"]
    quiet = Simulation(Config(dm_inbox=False), seed=1)
    quiet.connect("alice").dm("bob", "hi")
    assert list(quiet.connect("bob").of_type("welcome")[-1]["rooms"]) == []


def test_join_and_leave_events() -> None:
    sim = Simulation(seed=1)
    alice = sim.connect("alice", room="general")
    bob = sim.connect("bob")
    bob.join("general")
    assert bob.of_type("members")[-1]["users"] == ["alice", "bob"]
    assert alice.take()[-1] == {"type": "joined", "room": "general", "user": "bob"}
    bob.join("general")  # joining twice is harmless: the member list again
    assert alice.take() == []
    bob.leave("general")
    assert alice.take() == [{"type": "left", "room": "general", "user": "bob"}]
    assert bob.take()[-1] == {"type": "left", "room": "general", "user": "bob"}
    bob.leave("general")
    assert bob.take()[-1]["code"] == "not_member"


def test_empty_rooms_are_dropped_from_memory_but_history_stays() -> None:
    sim = Simulation(seed=1)
    alice = sim.connect("alice", room="general")
    alice.send("remember me")
    alice.leave("general")
    assert "general" not in sim.engine.rooms()
    bob = sim.connect("bob", room="general")
    assert bob.of_type("welcome")[0]["rooms"]["general"]["offset"] == 1
    bob.history("general")
    assert [m["text"] for m in bob.of_type("history")[0]["messages"]] == ["remember me"]


def test_room_limit_per_session() -> None:
    sim = Simulation(Config(max_rooms_per_session=2), seed=1)
    alice = sim.connect("alice", rooms=["a", "b", "c"])
    assert set(alice.of_type("welcome")[0]["rooms"]) == {"a", "b"}
    assert alice.of_type("error")[0]["code"] == "room_limit"


def test_typing_is_shown_throttled_and_expires() -> None:
    sim = Simulation(Config(typing_ttl=5.0), seed=1)
    alice = sim.connect("alice", room="general")
    bob = sim.connect("bob", room="general")
    alice.typing()
    alice.typing()  # a refresh right away is not re-sent
    assert bob.of_type("typing") == [
        {"type": "typing", "room": "general", "user": "alice", "active": True}
    ]
    sim.advance(3)
    alice.typing()  # past half the lifetime: sent again, lifetime extended
    sim.advance(4.9)
    assert len(bob.of_type("typing")) == 2
    sim.advance(0.2)
    assert bob.of_type("typing")[-1]["active"] is False
    assert alice.of_type("typing") == []


def test_read_marks_are_kept_and_shown_to_the_room() -> None:
    sim = Simulation(seed=1)
    alice = sim.connect("alice", room="general")
    bob = sim.connect("bob", room="general")
    alice.send("a")
    alice.send("b")
    bob.read(5)  # clamped to the head
    assert alice.of_type("read") == [
        {"type": "read", "room": "general", "user": "bob", "offset": 2}
    ]
    bob.read(1)  # going back is ignored
    assert len(alice.of_type("read")) == 1
    assert sim.store.positions_by_key["bob", "general"] == (2, 2)
    other_tab = sim.connect("bob", room="general")
    assert other_tab.of_type("welcome")[0]["rooms"]["general"]["read"] == 2


def test_read_marks_survive_the_room_emptying_and_loading_again() -> None:
    sim = Simulation(seed=1)
    alice = sim.connect("alice", room="general")
    bob = sim.connect("bob", room="general")
    for text in ("a", "b", "c"):
        alice.send(text)
    bob.read(2)
    alice.read(3)
    sim.close(alice)
    sim.close(bob)
    assert sim.engine.stats()["rooms"] == 0  # nobody left: the room is dropped from memory
    bob = sim.connect("bob", room="general")
    assert bob.of_type("welcome")[0]["rooms"]["general"]["read"] == 2
    bob.read(1)  # still behind the stored mark: ignored, nobody is told
    alice = sim.connect("alice", room="general")
    assert alice.of_type("welcome")[0]["rooms"]["general"]["read"] == 3
    assert alice.of_type("read") == []
    bob.read(3)
    assert alice.of_type("read") == [
        {"type": "read", "room": "general", "user": "bob", "offset": 3}
    ]


def test_history_pages_backwards_from_memory() -> None:
    sim = Simulation(seed=1)
    alice = sim.connect("alice", room="general")
    for i in range(1, 8):
        alice.send(f"m{i}")
    alice.history(limit=3)
    alice.history(before=5, limit=3)
    alice.history(before=2, limit=3)
    alice.history(before=1)
    pages = alice.of_type("history")
    assert [[m["offset"] for m in p["messages"]] for p in pages] == [[5, 6, 7], [2, 3, 4], [1], []]
    assert [p["more"] for p in pages] == [True, True, False, False]


def test_history_past_the_window_comes_from_the_store() -> None:
    sim = Simulation(Config(history_window=3, history_page_max=4), seed=1)
    alice = sim.connect("alice", room="general")
    for i in range(1, 11):
        sim.advance(1)
        alice.send(f"m{i}")
    alice.history(before=9, limit=100)
    page = alice.of_type("history")[-1]
    assert [m["offset"] for m in page["messages"]] == [5, 6, 7, 8]
    assert page["more"] is True


def test_store_outage_gives_unavailable_and_nothing_is_broadcast() -> None:
    sim = Simulation(Config(history_window=2), seed=1)
    alice = sim.connect("alice", room="general")
    bob = sim.connect("bob", room="general")
    for i in range(4):
        alice.send(f"m{i}")
    sim.store.available = False
    alice.send("lost?", id="u1")
    assert alice.of_type("error")[-1] == {
        "type": "error",
        "code": "unavailable",
        "message": "message not stored: store unavailable",
        "ref": "u1",
    }
    bob.history(before=2)
    assert bob.of_type("error")[-1]["code"] == "unavailable"
    assert bob.texts() == ["m0", "m1", "m2", "m3"]
    sim.store.available = True
    alice.send("lost?", id="u1")
    assert bob.texts()[-1] == "lost?"


def test_plain_text_mode_for_websocat_users() -> None:
    sim = Simulation(seed=1)
    alice = sim.connect("alice", room="general")
    bob = sim.connect("bob", room="general", mode=Mode.TEXT)
    assert bob.lines() == ["In the room: alice, bob"]
    bob.send("hello from websocat")
    assert alice.texts() == ["hello from websocat"]
    alice.send("hi Bob")
    carol = sim.connect("carol", room="general")
    carol.leave("general")
    assert bob.lines()[1:] == ["alice: hi Bob", "carol joined the room", "carol left the room"]


def test_plain_text_mode_without_a_room_gets_an_error_line() -> None:
    sim = Simulation(seed=1)
    bob = sim.connect("bob", mode=Mode.TEXT)
    bob.send("anyone?")
    assert bob.lines() == ["error: join a room first"]


def test_invalid_user_name_is_refused_with_policy_violation() -> None:
    sim = Simulation(seed=1)
    bad = sim.connect("no spaces allowed", room="general")
    assert bad.closed == (1008, "invalid user name")
    assert sim.engine.connections == 0


def test_store_answers_with_latency_keep_the_order() -> None:
    sim = Simulation(Config(rate_burst=100, request_burst=100), seed=3, store_latency=2.0)
    alice = sim.connect("alice", room="general")
    bob = sim.connect("bob", room="general")
    sim.advance(5)
    for i in range(20):
        alice.send(f"m{i}")
        sim.advance(0.05)
    sim.advance(5)
    assert bob.texts() == [f"m{i}" for i in range(20)]
    assert [m["offset"] for m in bob.messages()] == list(range(1, 21))


def test_messages_from_another_process_are_delivered_in_log_order() -> None:
    # Another process appended offsets 1 and 2 to the shared log; this engine
    # hears of 2 first, fetches the gap from the log, and delivers 1 then 2.
    from chatcore import Append, Appended

    sim = Simulation(seed=1)
    bob = sim.connect("bob", room="general")
    answers = sim.store.execute_now(
        [
            Append(ref=900, room="general", sender="zed", text="first", ts=0),
            Append(ref=901, room="general", sender="zed", text="second", ts=0),
        ]
    )
    first, second = (Appended(message=a.message) for a in answers if isinstance(a, Appended))
    sim.feed(second)
    assert bob.texts() == ["first", "second"]
    sim.feed(first)  # heard late: already delivered, not again
    assert bob.texts() == ["first", "second"]


def test_the_host_can_publish_as_a_bot_to_members_and_to_history() -> None:
    from chatcore import LocalProtocolError, Publish

    sim = Simulation(seed=1)
    alice = sim.connect("alice", room="general")
    sim.feed(Publish(room="general", sender="helpdesk", text="We are open"))
    assert alice.messages()[-1]["from"] == "helpdesk"
    assert alice.messages()[-1]["text"] == "We are open"
    sim.feed(Publish(room="quiet", sender="helpdesk", text="nobody is here"))
    assert [m.text for m in sim.store.messages("quiet")] == ["nobody is here"]
    stored = [m.text for m in sim.store.messages("general")]
    for bad in (
        Publish(room="no way", sender="bot", text="x"),
        Publish(room="general", sender="bot", text=""),
        Publish(room="general", sender="bot", text="\x01e2e:{}"),  # the encryption marker
        Publish(room="dm:alice:bob", sender="bob", text='\x01e2e:{"v":1,"device":"d"}'),
        Publish(room="general", sender="bot", text="\ud800"),
    ):
        with pytest.raises(LocalProtocolError):
            sim.feed(bad)
    # Nothing was appended nor delivered by the refused ones.
    assert [m.text for m in sim.store.messages("general")] == stored
    assert alice.messages()[-1]["text"] == "We are open"
    sim.feed(Publish(room="general", sender="bot", text="a marker later: \x01e2e: is fine"))
    assert alice.messages()[-1]["from"] == "bot"


def test_every_kind_of_request_is_rate_limited_and_typing_spam_costs_no_memory() -> None:
    sim = Simulation(Config(request_burst=20, request_per_second=10.0), seed=1)
    alice = sim.connect("alice", room="general")
    bob = sim.connect("bob", room="general")
    timers_before = sim.engine.stats()["timers"]
    for _ in range(30):
        alice.typing()
    errors = alice.of_type("error")
    assert len(errors) == 10
    assert {e["code"] for e in errors} == {"rate_limited"}
    assert len(bob.of_type("typing")) == 1
    assert sim.engine.stats()["timers"] == timers_before + 1
    sim.advance(1)
    alice.send("still allowed")
    assert bob.texts() == ["still allowed"]


def test_sessions_per_user_are_bounded_oldest_waiting_one_goes_first() -> None:
    sim = Simulation(Config(max_sessions_per_user=2), seed=1)
    watcher = sim.connect("watcher", room="general")
    first = sim.connect("mallory", room="general")
    sim.drop(first)
    second = sim.connect("mallory", room="general")
    third = sim.connect("mallory", room="general")  # ends the waiting first session
    assert third.connected
    sim.resume(first)  # its session was ended, and both slots are live now
    assert first.closed == (1008, "too many sessions")
    assert len(first.of_type("welcome")) == 1
    assert second.connected
    assert sim.engine.stats()["sessions"] == 3
    assert watcher.of_type("left") == []  # mallory never left: other sessions remain


def test_presence_events_stop_above_the_presence_limit() -> None:
    sim = Simulation(Config(presence_limit=3), seed=1)
    alice = sim.connect("alice", room="hall")
    sim.connect("bob", room="hall")
    sim.connect("carol", room="hall")
    dave = sim.connect("dave", room="hall")  # the 4th user: the room is a crowd now
    assert [e["user"] for e in alice.of_type("joined")] == ["bob", "carol"]
    assert dave.of_type("members")[0]["users"] == ["alice", "bob", "carol", "dave"]
    dave.leave("hall")  # leaving a crowd is not announced either
    assert [e["user"] for e in alice.of_type("left")] == []
    sim.drop(sim.clients[1])
    sim.advance(31)  # bob's grace period ends: the room of 3 was no crowd
    assert [e["user"] for e in alice.of_type("left")] == ["bob"]
