"""Screening: a host hook sees every client message before it is appended and
accepts it, refuses it (the sender gets ``refused``) or replaces its text."""

from __future__ import annotations

import pytest

from chatcore import (
    Append,
    Config,
    Connect,
    Engine,
    LocalProtocolError,
    Receive,
    Screen,
    Screened,
    SeededIds,
    Verdict,
)
from chatcore_sim import Simulation

BANNED = {"darn", "heck"}


def filter_words(screen: Screen) -> Screened:
    if screen.text.startswith("!"):
        return screen.refuse("commands are for bots")
    words = screen.text.split()
    if any(w in BANNED for w in words):
        return screen.replace(" ".join("****" if w in BANNED else w for w in words))
    return screen.accept()


def test_an_accepted_message_is_delivered_and_acked_as_usual() -> None:
    seen: list[Screen] = []

    def hook(screen: Screen) -> Screened:
        seen.append(screen)
        return screen.accept()

    sim = Simulation(seed=1, screen=hook)
    alice = sim.connect("alice", room="general")
    bob = sim.connect("bob", room="general")
    alice.send("hello", id="c1")
    assert [(s.room, s.sender, s.text, s.client_id) for s in seen] == [
        ("general", "alice", "hello", "c1")
    ]
    assert bob.texts() == ["hello"]
    epoch = bob.of_type("message")[0]["epoch"]
    assert alice.of_type("ack") == [
        {"type": "ack", "room": "general", "offset": 1, "epoch": epoch, "id": "c1"}
    ]


def test_a_replaced_message_is_stored_and_delivered_as_replaced() -> None:
    sim = Simulation(seed=1, screen=filter_words)
    alice = sim.connect("alice", room="general")
    bob = sim.connect("bob", room="general")
    alice.send("oh darn it", id="c1")
    assert bob.texts() == ["oh **** it"]
    assert sim.store.messages("general")[0].text == "oh **** it"
    assert alice.of_type("ack")[0]["offset"] == 1


def test_a_refused_message_reaches_no_one_and_its_sender_hears_why() -> None:
    sim = Simulation(seed=1, screen=filter_words)
    alice = sim.connect("alice", room="general")
    bob = sim.connect("bob", room="general")
    alice.send("!kick bob", id="c1")
    alice.send("fine then")  # no client id: the error's ref is the room
    assert bob.texts() == ["fine then"]
    assert [m.text for m in sim.store.messages("general")] == ["fine then"]
    assert alice.of_type("error") == [
        {"type": "error", "code": "refused", "message": "commands are for bots", "ref": "c1"}
    ]
    assert alice.connected


def test_a_refused_id_is_screened_afresh_when_retried() -> None:
    """A refusal stores nothing, so a retry with the same client id is a new
    message to the hook: it is refused again only if the hook says so."""
    verdicts = iter(["refuse", "accept", "accept"])

    def hook(screen: Screen) -> Screened:
        return screen.refuse("not now") if next(verdicts) == "refuse" else screen.accept()

    sim = Simulation(seed=1, screen=hook)
    alice = sim.connect("alice", room="general")
    bob = sim.connect("bob", room="general")
    alice.send("hi", id="c1")
    alice.send("hi", id="c1")
    alice.send("hi", id="c1")  # accepted again: the log knows the id, no second message
    assert [e["code"] for e in alice.of_type("error")] == ["refused"]
    assert [a["offset"] for a in alice.of_type("ack")] == [1, 1]
    assert bob.texts() == ["hi"]


def test_without_screening_no_screen_effect_is_made() -> None:
    engine = Engine(Config(), SeededIds(1))
    engine.handle(Connect(conn=1, user="amy", rooms=()), 1.0)
    out = engine.handle(Receive(conn=1, text='{"type":"dm","to":"bob","text":"x"}'), 1.0)
    assert not any(isinstance(e, Screen) for e in out)


def screening_engine() -> tuple[Engine, Screen]:
    """An engine holding one screened message whose verdict the test gives."""
    from chatcore import InboxLoaded, LoadInbox, LoadRoom, RoomLoaded

    engine = Engine(Config(screen_messages=True), SeededIds(1))
    out = engine.handle(Connect(conn=1, user="amy", rooms=("general",)), 1.0)
    for effect in out:
        if isinstance(effect, LoadRoom):
            out += engine.handle(RoomLoaded(room="general", epoch="e", head=0), 1.0)
        elif isinstance(effect, LoadInbox):
            out += engine.handle(InboxLoaded(ref=effect.ref, rooms=()), 1.0)
    out = engine.handle(
        Receive(conn=1, text='{"type":"send","room":"general","text":"hey","id":"c9"}'), 2.0
    )
    assert not any(isinstance(e, Append) for e in out)
    (screen,) = [e for e in out if isinstance(e, Screen)]
    return engine, screen


def test_a_message_waits_for_its_verdict_and_keeps_its_time() -> None:
    engine, screen = screening_engine()
    assert engine.stats()["pending_screens"] == 1
    assert engine.stats()["pending_appends"] == 0  # not the store's to answer yet
    out = engine.handle(screen.accept(), 9.0)
    assert (engine.stats()["pending_screens"], engine.stats()["pending_appends"]) == (0, 1)
    (append,) = [e for e in out if isinstance(e, Append)]
    assert (append.ref, append.text, append.ts, append.client_id) == (screen.ref, "hey", 2000, "c9")
    assert engine.handle(screen.accept(), 9.0) == []  # answered already: ignored


def test_a_message_whose_sender_left_is_still_appended_once_accepted() -> None:
    from chatcore import Disconnected

    engine, screen = screening_engine()
    engine.handle(Disconnected(conn=1, code=1000), 3.0)
    out = engine.handle(screen.replace("hey there"), 4.0)
    assert [e.text for e in out if isinstance(e, Append)] == ["hey there"]


@pytest.mark.parametrize(
    "text",
    [
        None,
        "",
        "x" * (64 * 1024 + 1),
        "\x01e2e:{}",  # the encryption marker: only a client can send an encrypted message
        '\x01e2e:{"v":1,"device":"d","payloads":{}}',
        "\ud800",  # not valid Unicode: a mistake named, not a UnicodeEncodeError
    ],
)
def test_a_replacement_out_of_bounds_is_the_host_s_mistake(text: str | None) -> None:
    engine, screen = screening_engine()
    with pytest.raises(LocalProtocolError):
        engine.handle(Screened(ref=screen.ref, verdict=Verdict.REPLACE, text=text), 3.0)
    # Nothing changed: a proper verdict still goes through.
    assert any(isinstance(e, Append) for e in engine.handle(screen.accept(), 3.0))


def test_screened_runs_replay_identically() -> None:
    from chatcore import replay

    lines: list[str] = []
    sim = Simulation(seed=2, screen=filter_words, record=lines.append)
    alice = sim.connect("alice", room="general")
    sim.connect("bob", room="general")
    alice.send("darn", id="1")
    alice.send("!op", id="2")
    alice.send("ok", id="3")
    assert replay(lines) is None


def test_a_hook_that_never_answers_holds_a_bounded_number_of_messages() -> None:
    """Invariant: however many messages are sent, and however many senders come
    and go, the engine holds at most ``max_screening`` awaiting a verdict (at most
    ``max_screening_per_session`` per live session); the rest are refused with
    ``rate_limited`` and nothing is lost that was not refused."""
    held: list[Screen] = []

    def behind(screen: Screen) -> None:
        held.append(screen)  # the verdict never comes (until the test gives it)

    config = Config(max_screening_per_session=3, max_screening=5, rate_burst=100)
    sim = Simulation(config, seed=1, screen=behind)
    alice = sim.connect("alice", room="general")
    bob = sim.connect("bob", room="general")
    for i in range(6):
        alice.send(f"a{i}", id=f"a{i}")
    assert len(held) == 3
    assert [(e["code"], e["ref"], e["retry_after"]) for e in alice.of_type("error")] == [
        ("rate_limited", f"a{i}", 1.0) for i in range(3, 6)
    ]
    assert sim.engine.stats()["pending_screens"] == 3
    assert sim.engine.counters().rate_limited == {"screening": 3}

    # The senders leave; what they sent still awaits its verdict and still counts.
    sim.close(alice)
    for round_ in range(4):
        carol = sim.connect("carol", room="general")
        for i in range(4):
            carol.send(f"c{round_}.{i}")
        sim.close(carol)
    assert len(held) == 5  # the engine-wide bound: 3 of alice's, 2 of carol's first session
    assert sim.engine.stats()["pending_screens"] == 5
    assert sim.engine.stats()["sessions"] == 1  # bob: the ended sessions are gone

    # The host catches up: every held message is appended, its sender gone or not.
    for screen in held:
        sim.feed(screen.accept())
    assert sim.engine.stats()["pending_screens"] == 0
    assert bob.texts() == ["a0", "a1", "a2", "c0.0", "c0.1"]
    held.clear()
    bob.send("room again")
    assert [s.text for s in held] == ["room again"]


def test_the_bound_frees_a_slot_for_each_verdict_refusals_included() -> None:
    held: list[Screen] = []
    sim = Simulation(
        Config(max_screening_per_session=2, rate_burst=100), seed=1, screen=held.append
    )
    alice = sim.connect("alice", room="general")
    alice.send("one", id="1")
    alice.send("two", id="2")
    alice.send("three", id="3")
    assert [e["ref"] for e in alice.of_type("error")] == ["3"]
    sim.feed(held[0].refuse("no"))
    alice.send("three", id="3")  # the retry takes the freed slot
    assert [s.client_id for s in held] == ["1", "2", "3"]
    assert sim.engine.stats()["pending_screens"] == 2
