"""Call signalling through the engine, on the simulator's virtual clock.

Clients speak the wire protocol of docs/protocol.md section 8. What a user
would notice: who rings, who hears which signal, and when and why a call ends.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from chatcore import Append, Command, Config, Mode
from chatcore_sim import SimClient, Simulation
from chatcore_store import MemoryStore, StorageEffect

SDP = "v=0\r\no=- 46117 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n"
CAND = "candidate:842163049 1 udp 1677729535 192.0.2.7 51234 typ srflx raddr 0.0.0.0 rport 0"


class RecordingStore(MemoryStore):
    """A memory store that remembers every effect it was asked to carry out."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[StorageEffect] = []

    def execute_now(self, effects: Sequence[StorageEffect]) -> list[Command]:
        self.asked.extend(effects)
        return super().execute_now(effects)


def types(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


def ended(client: SimClient, call: str = "c1") -> list[str]:
    return [e["reason"] for e in client.calls(call) if e["type"] == "ended"]


def errors(client: SimClient) -> list[tuple[str, str | None]]:
    return [(e["code"], e["ref"]) for e in client.of_type("error")]


def ring(sim: Simulation, caller: SimClient, to: str, call: str = "c1") -> None:
    caller.signal("call", call, to=to, video=True)
    caller.signal("offer", call, sdp=SDP)
    caller.signal("candidate", call, candidate=CAND, mid="0", index=0)


def setup(
    config: Config | None = None, **kw: Any
) -> tuple[Simulation, SimClient, SimClient, SimClient]:
    sim = Simulation(config or Config(), seed=7, **kw)
    alice = sim.connect("alice", "lobby")
    bob1 = sim.connect("bob", "lobby")
    bob2 = sim.connect("bob", "lobby")
    return sim, alice, bob1, bob2


def test_answered_on_one_of_two_tabs_the_other_stops_ringing() -> None:
    sim, alice, bob1, bob2 = setup()
    ring(sim, alice, "bob")
    for tab in (bob1, bob2):  # both ring, with the offer and the candidate to answer with
        assert types(tab.calls("c1")) == ["call", "offer", "candidate"]
        assert tab.calls("c1")[0]["from"] == "alice"
        assert tab.calls("c1")[1]["sdp"] == SDP
    assert types(alice.calls("c1")) == ["ringing"]
    bob1.take()
    bob2.take()

    bob2.signal("answer", "c1", sdp=SDP.replace("46117", "9"))
    assert alice.calls("c1")[-1] == {
        "type": "answer",
        "call": "c1",
        "from": "bob",
        "sdp": SDP.replace("46117", "9"),
    }
    assert ended(bob1) == ["answered_elsewhere"]
    bob1.take()

    alice.signal("candidate", "c1", candidate=CAND, mid="0", index=0)
    bob2.signal("candidate", "c1", candidate=CAND, mid="0", index=0)
    bob2.signal("connected", "c1")
    assert types(bob2.take()) == ["candidate"]
    assert types(alice.calls("c1")) == ["ringing", "answer", "candidate"]
    assert bob1.take() == []  # the other tab hears nothing more of the call
    bob1.signal("answer", "c1", sdp=SDP)  # and cannot take it back
    assert errors(bob1) == [("no_call", "c1")]
    assert types(alice.calls("c1")) == ["ringing", "answer", "candidate"]


def test_the_caller_closing_ends_the_call_for_the_callee_at_once() -> None:
    sim, alice, bob1, _ = setup()
    ring(sim, alice, "bob")
    bob1.signal("answer", "c1", sdp=SDP)
    sim.close(alice)  # 1000: the session ends now
    assert ended(bob1) == ["gone"]
    assert sim.engine.stats()["calls"] == 0


def test_a_caller_who_drops_is_given_the_grace_period_then_the_callee_is_told() -> None:
    sim, alice, bob1, _ = setup(Config(grace_period=30.0))
    ring(sim, alice, "bob")
    bob1.signal("answer", "c1", sdp=SDP)
    bob1.signal("connected", "c1")
    sim.drop(alice)
    sim.advance(29.9)
    assert ended(bob1) == []
    sim.advance(0.2)
    assert ended(bob1) == ["gone"]


def test_the_callee_hanging_up_or_going_away_is_told_to_the_caller() -> None:
    sim, alice, bob1, _ = setup()
    ring(sim, alice, "bob")
    bob1.signal("answer", "c1", sdp=SDP)
    bob1.signal("hangup", "c1")
    assert ended(alice) == ["hangup"]
    ring(sim, alice, "bob", call="c2")
    bob1.signal("answer", "c2", sdp=SDP)
    sim.close(bob1)
    assert ended(alice, "c2") == ["gone"]


def test_callee_busy() -> None:
    sim, alice, bob1, bob2 = setup()
    ring(sim, alice, "bob")
    bob1.signal("busy", "c1")
    assert ended(alice) == ["busy"]
    assert ended(bob2) == ["busy"]  # the other tab stops ringing too
    assert ended(bob1) == []  # it said so itself


def test_declined_on_one_tab_stops_every_tab() -> None:
    sim, alice, bob1, bob2 = setup()
    ring(sim, alice, "bob")
    bob2.signal("decline", "c1")
    assert ended(alice) == ["declined"]
    assert ended(bob1) == ["declined"]


def test_an_unanswered_call_times_out() -> None:
    sim, alice, bob1, bob2 = setup(Config(call_ring_timeout=30.0))
    ring(sim, alice, "bob")
    sim.advance(29.9)
    assert ended(alice) == []
    sim.advance(0.1)
    assert ended(alice) == ["timeout"]
    assert ended(bob1) == ended(bob2) == ["timeout"]
    bob1.signal("answer", "c1", sdp=SDP)  # too late
    assert errors(bob1) == [("no_call", "c1")]


def test_an_answered_call_that_never_connects_ends_as_failed() -> None:
    sim, alice, bob1, _ = setup(Config(call_connect_timeout=20.0))
    ring(sim, alice, "bob")
    bob1.signal("answer", "c1", sdp=SDP)
    sim.advance(20.0)
    assert ended(alice) == ended(bob1) == ["failed"]


def test_calling_someone_who_is_not_online() -> None:
    _, alice, _, _ = setup()
    alice.signal("call", "c9", to="dave")
    assert ended(alice, "c9") == ["offline"]
    assert types(alice.calls("c9")) == ["ended"]


def test_a_callee_online_only_in_plain_text_mode_is_unavailable_at_once() -> None:
    sim, alice, _, _ = setup(Config(call_ring_timeout=30.0))
    dave = sim.connect("dave", "lobby", mode=Mode.TEXT)  # websocat: no call frames
    before = dave.lines()
    ring(sim, alice, "dave")
    # Told at once, not after the ringing timeout; the offer and candidate that
    # follow the ring are refused as for any call that is over.
    assert ended(alice) == ["unavailable"]
    assert types(alice.calls("c1")) == ["ended"]
    assert errors(alice) == [("no_call", "c1"), ("no_call", "c1")]
    assert dave.lines() == before  # nothing reached the plain-text connection
    sim.drop(dave)  # away in its grace period: still online, still no calls
    alice.signal("call", "c2", to="dave")
    assert ended(alice, "c2") == ["unavailable"]
    assert sim.engine.stats()["calls"] == 0


def test_only_the_callee_s_sessions_that_take_calls_ring() -> None:
    sim, alice, _, _ = setup()
    dave_tab = sim.connect("dave", "lobby")
    dave_term = sim.connect("dave", "lobby", mode=Mode.TEXT)
    before = dave_term.lines()
    ring(sim, alice, "dave")
    assert types(dave_tab.calls("c1")) == ["call", "offer", "candidate"]
    assert types(alice.calls("c1")) == ["ringing"]
    dave_tab.signal("answer", "c1", sdp=SDP)
    assert types(alice.calls("c1")) == ["ringing", "answer"]
    # The terminal never rang: once the one tab that did is gone, the caller hears at once.
    alice.signal("call", "c2", to="dave")
    sim.close(dave_tab)
    assert ended(alice, "c1") == ["gone"]
    assert ended(alice, "c2") == ["offline"]
    assert dave_term.lines() == before


def test_a_third_user_can_never_inject_a_signal_into_someone_elses_call() -> None:
    sim, alice, bob1, bob2 = setup()
    carol = sim.connect("carol", "lobby")
    alice2 = sim.connect("alice", "lobby")  # the caller's own other tab is no party either
    ring(sim, alice, "bob")

    def inject(who: SimClient) -> None:
        who.signal("offer", "c1", sdp=SDP)
        who.signal("answer", "c1", sdp=SDP)
        who.signal("candidate", "c1", candidate=CAND, mid="0", index=0)
        who.signal("connected", "c1")
        who.signal("decline", "c1")
        who.signal("busy", "c1")
        who.signal("hangup", "c1")
        who.signal("call", "c1", to="bob")

    inject(carol)  # while ringing
    bob1.signal("answer", "c1", sdp=SDP)
    inject(carol)  # once answered
    inject(alice2)
    inject(bob2)
    for who in (carol, alice2):
        assert {code for code, _ in errors(who)} == {"no_call", "invalid_field"}
        assert {ref for _, ref in errors(who)} == {"c1"}
    # The parties heard only each other, and the call goes on.
    for party in (alice, bob1):
        assert all(e.get("from") in (None, "alice", "bob") for e in party.calls("c1"))
    assert types(alice.calls("c1")) == ["ringing", "answer"]
    assert types(bob1.calls("c1")) == ["call", "offer", "candidate"]
    alice.signal("hangup", "c1")
    assert ended(bob1) == ["hangup"]


def test_a_session_away_gets_fresh_signals_on_resuming_and_never_stale_ones() -> None:
    sim, alice, bob1, bob2 = setup(Config(call_signal_ttl=5.0, grace_period=30.0))
    sim.close(bob2)
    bob1.take()
    sim.drop(bob1)
    ring(sim, alice, "bob")  # bob is away: it rings on the session in its grace period
    sim.advance(2.0)
    sim.resume(bob1)
    got = bob1.take()
    assert types(got)[0] == "welcome"
    assert types(got)[1:4] == ["call", "offer", "candidate"]  # right after the welcome
    bob1.signal("answer", "c1", sdp=SDP)

    sim.drop(bob1)
    alice.signal("candidate", "c1", candidate=CAND, mid="0", index=0)
    sim.advance(5.5)
    alice.signal("candidate", "c1", candidate=CAND.replace("51234", "4"), mid="0", index=0)
    sim.resume(bob1)
    got = [e for e in bob1.take() if e["type"] == "candidate"]
    assert [e["candidate"] for e in got] == [CAND.replace("51234", "4")]  # not the stale one


def test_call_signals_are_never_stored() -> None:
    store = RecordingStore()
    sim, alice, bob1, _ = setup(store=store)
    ring(sim, alice, "bob")
    bob1.signal("answer", "c1", sdp=SDP)
    bob1.signal("candidate", "c1", candidate=CAND, mid="0", index=0)
    alice.signal("hangup", "c1")
    assert ended(bob1) == ["hangup"]
    assert [e for e in store.asked if isinstance(e, Append)] == []
    asked = json.dumps([repr(e) for e in store.asked])
    assert "c1" not in asked
    assert SDP[:20] not in asked
    assert CAND not in asked
    alice.history("lobby")
    alice.dm("bob", "after the call")
    alice.history("dm:alice:bob")
    texts = [m["text"] for h in alice.of_type("history") for m in h["messages"]]
    assert texts == ["after the call"]


def test_a_candidate_burst_neither_spends_nor_waits_for_the_chat_limits() -> None:
    sim, alice, bob1, _ = setup(Config(rate_burst=10, request_burst=60))
    ring(sim, alice, "bob")
    for n in range(55):
        alice.signal("candidate", "c1", candidate=f"{CAND} generation {n}", mid="0", index=0)
    for n in range(10):
        alice.send(f"still chatting {n}", "lobby")
    for _ in range(49):
        alice.typing("lobby")
    assert errors(alice) == []
    assert len(alice.of_type("ack")) == 10
    assert len([e for e in bob1.calls("c1") if e["type"] == "candidate"]) == 56
    for n in range(5):  # the signal bucket is its own: 60, and the 61st waits
        alice.signal("candidate", "c1", candidate=f"{CAND} late {n}", mid="0", index=0)
    assert [code for code, _ in errors(alice)] == ["rate_limited"] * 3


def test_signal_sizes_are_bounded_with_an_error_for_the_sender_alone() -> None:
    sim, alice, bob1, _ = setup(Config(max_sdp_bytes=16 * 1024))
    ring(sim, alice, "bob")
    bob1.take()
    alice.signal("offer", "c1", sdp="x" * (16 * 1024 + 1))
    alice.signal("offer", "c1", sdp=5)
    alice.signal("candidate", "c1", candidate=CAND, index=70000)
    alice.signal("call", "c2", to="bob", video="yes")
    assert errors(alice) == [
        ("too_large", "c1"),
        ("invalid_field", "c1"),
        ("invalid_field", "c1"),
        ("invalid_field", "c2"),
    ]
    assert bob1.take() == []


# -- any sequence of call frames, from anyone -------------------------------------

USERS = ("alice", "bob", "carol")
CALL_IDS = ("k1", "k2", "k3")
KINDS = ("call", "offer", "answer", "candidate", "connected", "decline", "busy", "hangup")
ERROR_CODES = {
    "no_call",
    "call_state",
    "call_limit",
    "invalid_field",
    "invalid_name",
    "too_large",
    "rate_limited",
}

actions = st.one_of(
    st.tuples(
        st.just("frame"),
        st.integers(0, 4),  # which client
        st.sampled_from(KINDS),
        st.sampled_from(CALL_IDS),
        st.sampled_from(USERS),
    ),
    st.tuples(st.just("advance"), st.sampled_from((0.5, 3.0, 6.0, 31.0))),
    st.tuples(st.just("drop"), st.integers(0, 4)),
    st.tuples(st.just("close"), st.integers(0, 4)),
    st.tuples(st.just("resume"), st.integers(0, 4)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(actions, max_size=40))
def test_whatever_is_sent_a_call_frame_reaches_only_the_calls_two_users(
    steps: list[tuple[Any, ...]],
) -> None:
    """Invariant: no exception; every error is a documented code; a client gets a
    call frame only for a call between its own user and one other, placed by one
    of them; and once every session is gone, nothing of any call is left."""
    sim = Simulation(Config(grace_period=30.0), seed=3)
    owners = ["alice", "bob", "bob", "carol", "alice"]
    clients = [sim.connect(user, "lobby") for user in owners]
    rung: set[frozenset[str]] = set()  # pairs of users one of whom rang the other
    for step in steps:
        match step:
            case ("frame", i, kind, call, to):
                client = clients[i]
                if not client.connected:
                    continue
                fields: dict[str, Any] = {}
                if kind == "call":
                    fields = {"to": to, "video": False}
                    rung.add(frozenset((client.user, to)))
                elif kind in ("offer", "answer"):
                    fields = {"sdp": SDP}
                elif kind == "candidate":
                    fields = {"candidate": CAND, "mid": "0", "index": 0}
                client.signal(kind, call, **fields)
            case ("advance", seconds):
                sim.advance(seconds)
            case ("drop", i) if clients[i].connected:
                sim.drop(clients[i])
            case ("close", i) if clients[i].connected:
                sim.close(clients[i])
            case ("resume", i) if not clients[i].connected:
                sim.resume(clients[i])
            case _:
                pass
        for client in clients:
            for event in client.calls():
                other = event.get("from") or event.get("to") or event.get("with")
                assert other != client.user
                assert frozenset((client.user, other)) in rung
    for client in clients:
        codes = {e["code"] for e in client.of_type("error")}
        assert codes <= ERROR_CODES
    for client in clients:
        if client.connected:
            sim.close(client)
    sim.advance(60.0)
    stats = sim.engine.stats()
    assert [stats[k] for k in stats if k.startswith("call")] == [0] * 5, stats
