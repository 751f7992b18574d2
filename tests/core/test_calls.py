"""The call state machine (``chatcore._calls``) on its own: the table, and calls
driven through :class:`Calls` with sessions named by hand and time passed in.

The engine and the wire are in ``test_call_signalling.py``; here every
(state, input) pair of the table is reached through the module's API and
checked against the table.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from chatcore import CallEvent, CallSignal, Config, ErrorEvent, LocalProtocolError, SignalKind
from chatcore._calls import TRANSITIONS, CallAction, CallInput, Calls, CallState, Notify, transition

T0 = 1000.0
K = SignalKind

SDP = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"


class Rig:
    """A :class:`Calls` with users' sessions as plain strings."""

    def __init__(self, config: Config | None = None, **sessions: list[str]) -> None:
        self.sessions: dict[str, list[str]] = {
            "alice": ["a1", "a2"],
            "bob": ["b1", "b2"],
            "carol": ["c1"],
        }
        self.sessions.update(sessions)
        self.plain_text: set[str] = set()  # users online on sessions that take no calls
        self.calls = Calls(
            config or Config(),
            lambda user: self.sessions.get(user, []),
            online=lambda user: bool(self.sessions.get(user)) or user in self.plain_text,
        )
        self.now = T0

    def user_of(self, session: str) -> str:
        return next(u for u, ss in self.sessions.items() if session in ss)

    def send(
        self, session: str, kind: SignalKind, call: str = "c-1", **fields: Any
    ) -> list[Notify]:
        if kind is K.OFFER or kind is K.ANSWER:
            fields.setdefault("sdp", SDP)
        if kind is K.CANDIDATE:
            fields.setdefault("candidate", "candidate:1 1 udp 2122260223 10.0.0.1 5000 typ host")
        request = CallSignal(conn=0, call=call, kind=kind, **fields)
        return self.calls.signal(self.user_of(session), session, request, self.now)

    def ring(self, session: str = "a1", to: str = "bob", call: str = "c-1") -> list[Notify]:
        return self.send(session, K.CALL, call, to=to, video=True)

    def to(self, out: list[Notify], session: str) -> list[Any]:
        return [n.event for n in out if n.session == session]


def kinds(events: list[Any]) -> list[str]:
    return [e.kind if isinstance(e, CallEvent) else f"error:{e.code}" for e in events]


def reasons(out: list[Notify]) -> dict[str, str | None]:
    return {
        n.session: n.event.reason
        for n in out
        if isinstance(n.event, CallEvent) and n.event.kind == "ended"
    }


# -- the table ---------------------------------------------------------------------


def test_the_table_lists_every_state_and_input() -> None:
    assert set(TRANSITIONS) == set(itertools.product(CallState, CallInput))


def test_ended_is_final_and_refusals_change_nothing() -> None:
    for (state, _), step in TRANSITIONS.items():
        if state is CallState.ENDED:
            assert step.next is CallState.ENDED
        if step.action in (CallAction.REFUSE, CallAction.IGNORE, CallAction.RELAY):
            assert step.next is state
        if step.action is CallAction.END:
            assert step.next is CallState.ENDED
            assert step.reason


def test_a_pair_missing_from_the_table_is_an_error_not_a_guess(monkeypatch: Any) -> None:
    import chatcore._calls as calls_module

    partial = dict(TRANSITIONS)
    del partial[CallState.RINGING, CallInput.CALLEE_ANSWER]
    monkeypatch.setattr(calls_module, "TRANSITIONS", partial)
    with pytest.raises(LocalProtocolError, match="ringing cannot take callee_answer"):
        transition(CallState.RINGING, CallInput.CALLEE_ANSWER)


def _in_state(state: CallState) -> Rig:
    """A call c-1 from a1 to bob (sessions b1, b2) in ``state``; answered on b1."""
    rig = Rig()
    if state is CallState.IDLE:
        return rig
    rig.ring()
    if state is CallState.RINGING:
        return rig
    rig.send("b1", K.ANSWER)
    if state is CallState.CONNECTING:
        return rig
    rig.send("a1", K.CONNECTED)
    assert rig.calls.state("c-1") is CallState.ACTIVE
    return rig


def _feed(rig: Rig, state: CallState, event: CallInput) -> tuple[str, list[Notify]]:
    """Make ``event`` happen through the public API; return the sender and what came out."""
    name = event.name
    if event is CallInput.RING:
        return "a1", rig.ring()
    if event is CallInput.TIMEOUT:
        deadline = rig.calls.next_deadline()
        rig.now = deadline if deadline is not None else rig.now + 3600
        return "", rig.calls.tick(rig.now)
    if event is CallInput.NO_RINGERS:
        if state is not CallState.RINGING:
            return "", []  # nobody rings once answered: not reachable, and IGNORE says so
        out = rig.calls.session_ended("b1", rig.now)
        return "b2", out + rig.calls.session_ended("b2", rig.now)
    if event is CallInput.UNAVAILABLE:
        if state is not CallState.RINGING:
            return "", []  # only a ring finds it out: not reachable, and IGNORE says so
        # c-1 rang bob's tabs; now bob is online in plain-text mode only, and c-1 rings again.
        rig.send("a1", SignalKind.HANGUP)
        rig.sessions["bob"] = []
        rig.plain_text.add("bob")
        return "", rig.ring()
    sender = "a1" if name.startswith("CALLER") else "b1"
    if name.endswith("GONE"):
        return sender, rig.calls.session_ended(sender, rig.now)
    return sender, rig.send(sender, SignalKind(name.split("_", 1)[1].lower()))


@pytest.mark.parametrize(
    ("state", "event"),
    [
        pair
        for pair in itertools.product(CallState, CallInput)
        if pair[0] is not CallState.ENDED  # records are forgotten on ending: nothing is there
    ],
    ids=lambda v: v.value,
)
def test_every_pair_does_what_the_table_says(state: CallState, event: CallInput) -> None:
    rig = _in_state(state)
    step = TRANSITIONS[state, event]
    sender, out = _feed(rig, state, event)
    after = rig.calls.state("c-1")
    if event is CallInput.CALLEE_GONE and state is CallState.RINGING:
        # b1 left the ringing; b2 still rings: LEAVE_RING, no NO_RINGERS yet.
        assert step.action is CallAction.LEAVE_RING
        assert after is CallState.RINGING
        assert rig.calls.calls_of("b2") == ("c-1",)
        return
    expected = CallState.IDLE if step.next is CallState.ENDED else step.next
    assert after is expected
    errors = [n for n in out if isinstance(n.event, ErrorEvent)]
    if step.action is CallAction.REFUSE and state is not CallState.IDLE:
        assert [n.session for n in errors] == [sender]
        assert errors[0].event.code in ("call_state", "invalid_field")
    elif step.action is CallAction.REFUSE:  # no such call: the same answer for all
        assert [n.event.code for n in errors] == ["no_call"]
    else:
        assert not errors
    if step.action is CallAction.END:
        told = reasons(out)
        assert told, "somebody hears that the call ended"
        assert set(told.values()) == {step.reason}
        assert sender not in told
    if step.action is CallAction.RELAY:
        other = ["b1"] if sender == "a1" else ["a1"]
        if state is CallState.RINGING:
            other = ["b1", "b2"]
        assert sorted(n.session for n in out) == other


# -- calls, told as a user would notice them ----------------------------------------


def test_a_ring_reaches_every_session_of_the_callee_and_the_caller_hears_it_ring() -> None:
    rig = Rig()
    out = rig.ring()
    assert kinds(rig.to(out, "b1")) == ["call"]
    assert kinds(rig.to(out, "b2")) == ["call"]
    assert rig.to(out, "b1")[0].user == "alice"
    assert rig.to(out, "b1")[0].video is True
    assert kinds(rig.to(out, "a1")) == ["ringing"]
    assert rig.to(out, "a2") == []  # the caller's other tab is not in the call


def test_answered_on_one_tab_the_other_stops_ringing_and_hears_nothing_more() -> None:
    rig = Rig()
    rig.ring()
    out = rig.send("a1", K.OFFER)
    assert sorted(n.session for n in out) == ["b1", "b2"]  # both may answer it
    out = rig.send("b2", K.ANSWER)
    assert kinds(rig.to(out, "a1")) == ["answer"]
    assert rig.to(out, "a1")[0].sdp == SDP
    assert reasons(out) == {"b1": "answered_elsewhere"}
    out = rig.send("a1", K.CANDIDATE)
    assert [n.session for n in out] == ["b2"]
    out = rig.send("b1", K.ANSWER)  # too late: b1 is no party any more
    assert kinds(rig.to(out, "b1")) == ["error:no_call"]
    assert rig.to(out, "a1") == []


def test_nobody_else_can_inject_a_signal_into_a_call() -> None:
    rig = Rig(carol=["c1"])
    rig.ring()
    rig.send("b1", K.ANSWER)
    for session in ("c1", "a2", "b2"):  # a stranger, the caller's other tab, the callee's
        for kind in (K.OFFER, K.ANSWER, K.CANDIDATE, K.CONNECTED, K.HANGUP, K.DECLINE, K.BUSY):
            out = rig.send(session, kind)
            assert [(n.session, n.event.code) for n in out] == [(session, "no_call")]
    out = rig.ring("c1", to="alice")  # reusing the id to ring: refused
    assert [(n.session, n.event.code) for n in out] == [("c1", "invalid_field")]
    assert rig.calls.state("c-1") is CallState.CONNECTING


def test_a_stranger_hears_the_same_for_a_live_call_and_an_unknown_one() -> None:
    rig = Rig()
    rig.ring()
    live = rig.send("c1", K.HANGUP, "c-1")
    unknown = rig.send("c1", K.HANGUP, "c-404")
    assert [n.event.message for n in live] == [n.event.message for n in unknown]


def test_decline_and_busy_end_the_call_for_every_tab() -> None:
    rig = Rig()
    rig.ring()
    out = rig.send("b2", K.DECLINE)
    assert reasons(out) == {"a1": "declined", "b1": "declined"}
    rig.ring(call="c-2")
    out = rig.send("b1", K.BUSY, "c-2")
    assert reasons(out) == {"a1": "busy", "b2": "busy"}
    assert rig.calls.stats()["calls"] == 0


def test_an_unanswered_call_rings_out_at_its_deadline_not_before() -> None:
    rig = Rig(Config(call_ring_timeout=30.0))
    rig.ring()
    assert rig.calls.next_deadline() == T0 + 30.0
    assert rig.calls.tick(T0 + 29.999) == []
    out = rig.calls.tick(T0 + 30.0)
    assert reasons(out) == {"a1": "timeout", "b1": "timeout", "b2": "timeout"}
    assert rig.calls.next_deadline() is None


def test_an_answered_call_that_never_connects_fails_and_a_connected_one_stays() -> None:
    rig = Rig(Config(call_connect_timeout=20.0))
    rig.ring()
    rig.now += 5
    rig.send("b1", K.ANSWER)
    assert rig.calls.next_deadline() == T0 + 25.0
    out = rig.calls.tick(T0 + 25.0)
    assert reasons(out) == {"a1": "failed", "b1": "failed"}
    rig.ring(call="c-2")
    rig.send("b1", K.ANSWER, "c-2")
    rig.send("b1", K.CONNECTED, "c-2")
    assert rig.calls.next_deadline() is None
    assert rig.calls.tick(T0 + 10_000) == []
    assert rig.calls.state("c-2") is CallState.ACTIVE


def test_a_session_that_ends_ends_its_calls_and_the_other_side_is_told() -> None:
    rig = Rig()
    rig.ring()
    rig.send("b1", K.ANSWER)
    assert reasons(rig.calls.session_ended("a1", rig.now)) == {"b1": "gone"}
    rig.ring("a2", call="c-2")
    rig.send("b2", K.ANSWER, "c-2")
    assert reasons(rig.calls.session_ended("b2", rig.now)) == {"a2": "gone"}


def test_a_ringing_tab_that_ends_leaves_the_ring_and_the_last_one_out_ends_it() -> None:
    rig = Rig()
    rig.ring()
    assert rig.calls.session_ended("b1", rig.now) == []
    assert rig.calls.state("c-1") is CallState.RINGING
    assert reasons(rig.calls.session_ended("b2", rig.now)) == {"a1": "offline"}


def test_calling_someone_with_no_session_ends_at_once_as_offline() -> None:
    rig = Rig(dave=[])
    out = rig.ring(to="dave")
    assert kinds(rig.to(out, "a1")) == ["ended"]
    assert reasons(out) == {"a1": "offline"}


def test_calling_someone_online_only_where_calls_cannot_be_taken_ends_as_unavailable() -> None:
    rig = Rig(dave=[])
    rig.plain_text.add("dave")
    out = rig.ring(to="dave")
    assert kinds(rig.to(out, "a1")) == ["ended"]
    assert reasons(out) == {"a1": "unavailable"}
    assert rig.calls.stats()["calls"] == 0
    assert rig.calls.next_deadline() is None  # nothing left to ring out


def test_refused_rings() -> None:
    rig = Rig()
    assert kinds(rig.to(rig.ring(to="alice"), "a1")) == ["error:invalid_field"]
    assert kinds(rig.to(rig.ring(to="no body"), "a1")) == ["error:invalid_name"]
    assert kinds(rig.to(rig.ring(call="bad id!"), "a1")) == ["error:invalid_field"]


def test_calls_per_session_are_limited_when_placed_and_when_answered() -> None:
    rig = Rig(Config(max_calls_per_session=2), erin=["e1"])
    rig.ring(call="x1")
    rig.ring(call="x2", to="carol")
    out = rig.ring(call="x3", to="erin")
    assert kinds(rig.to(out, "a1")) == ["error:call_limit"]
    assert rig.calls.state("x3") is CallState.IDLE
    # b1 is in two calls already: answering a third is refused, and it keeps ringing.
    rig.send("b1", K.ANSWER, "x1")
    rig.send("c1", K.CALL, "y1", to="bob")
    rig.send("b1", K.ANSWER, "y1")
    rig.send("e1", K.CALL, "z1", to="bob")
    out = rig.send("b1", K.ANSWER, "z1")
    assert kinds(rig.to(out, "b1")) == ["error:call_limit"]
    assert rig.calls.state("z1") is CallState.RINGING
    assert kinds(rig.to(rig.send("b2", K.ANSWER, "z1"), "e1")) == ["answer"]


def test_signal_sizes_are_bounded() -> None:
    rig = Rig(Config(max_sdp_bytes=100, max_candidate_bytes=50))
    rig.ring()
    out = rig.send("a1", K.OFFER, sdp="x" * 101)
    assert kinds(rig.to(out, "a1")) == ["error:too_large"]
    assert rig.to(rig.send("a1", K.OFFER, sdp="é" * 50), "b1")  # 100 bytes: fits
    out = rig.send("a1", K.CANDIDATE, candidate="c" * 51)
    assert kinds(rig.to(out, "a1")) == ["error:too_large"]
    assert kinds(rig.to(rig.send("a1", K.OFFER, sdp=""), "a1")) == ["error:invalid_field"]


def test_a_candidate_burst_has_its_own_bucket() -> None:
    rig = Rig(Config(signal_burst=20, signal_per_second=10.0))
    rig.ring()
    out: list[Notify] = []
    for _ in range(19):  # the ring took one token
        out += rig.send("a1", K.CANDIDATE)
    assert not [n for n in out if isinstance(n.event, ErrorEvent)]
    refused = rig.send("a1", K.CANDIDATE)
    assert [n.event.code for n in refused] == ["rate_limited"]
    assert refused[0].event.retry_after == pytest.approx(0.1)
    rig.now += 0.1
    assert [n.session for n in rig.send("a1", K.CANDIDATE)] == ["b1", "b2"]


def test_signals_held_for_a_session_in_its_grace_period_expire() -> None:
    rig = Rig(Config(call_signal_ttl=5.0))
    out = rig.ring()
    ring = rig.to(out, "b2")[0]
    rig.calls.hold("b2", ring, rig.now)
    rig.now += 1
    offer = rig.to(rig.send("a1", K.OFFER), "b2")[0]
    rig.calls.hold("b2", offer, rig.now)
    assert rig.calls.release("b2", T0 + 4.5) == [ring, offer]  # 4.5 s old: still fresh
    rig.calls.hold("b2", ring, T0)
    rig.calls.hold("b2", offer, T0 + 1)
    assert rig.calls.release("b2", T0 + 5.5) == [offer]  # the ring is past its 5 s
    rig.calls.hold("b2", offer, rig.now)
    assert rig.calls.next_deadline() == T0 + 6.0
    rig.calls.tick(T0 + 6.0)
    assert rig.calls.stats()["call_signals_held"] == 0
    assert rig.calls.release("b2", T0 + 6.0) == []


def test_an_ended_call_drops_its_held_signals_but_its_end_is_kept() -> None:
    rig = Rig(Config(call_held_max=2))
    rig.ring()
    for _ in range(3):
        for n in rig.send("a1", K.CANDIDATE):
            if n.session == "b2":
                rig.calls.hold("b2", n.event, rig.now)
    assert rig.calls.stats()["call_signals_held"] == 2  # the third did not fit
    for n in rig.send("a1", K.HANGUP):
        if n.session == "b2":
            rig.calls.hold("b2", n.event, rig.now)
    held = rig.calls.release("b2", rig.now)
    assert kinds(held) == ["ended"]


def test_nothing_is_left_behind_when_calls_and_sessions_end() -> None:
    rig = Rig()
    rig.ring()
    rig.send("a1", K.OFFER)
    rig.send("b1", K.ANSWER)
    rig.ring("a2", to="carol", call="c-2")
    rig.calls.hold("c1", CallEvent(kind="call", call="c-2", user="alice"), rig.now)
    for session in ("a1", "a2", "b1", "b2", "c1"):
        rig.calls.session_ended(session, rig.now)
    rig.calls.tick(rig.now + 3600)
    assert rig.calls.next_deadline() is None
    assert rig.calls.stats() == {
        "calls": 0,
        "call_sessions": 0,
        "call_buckets": 0,
        "call_signals_held": 0,
        "call_timers": 0,
    }


def test_an_error_names_at_most_64_characters_of_a_call_id_however_it_is_refused() -> None:
    rig = Rig(Config(signal_burst=1, signal_per_second=1.0))
    long_id = "x" * 5000
    first = rig.send("a1", K.HANGUP, long_id)  # a bad id
    second = rig.send("a1", K.HANGUP, long_id)  # and now over the rate too
    assert [(n.event.code, n.event.ref) for n in first + second] == [
        ("invalid_field", "x" * 64),
        ("rate_limited", "x" * 64),
    ]
