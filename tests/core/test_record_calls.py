"""Call signals stay out of a record, and the record still replays identically.

A record holds every command; the SDP and ICE candidates of a call are the
one thing it must not hold (docs/protocol.md section 8: signals are never
stored). What a user of the record notices: the bytes of the record do not
contain them, and ``replay`` still finds every effect identical, down to
the size limits and the outbox accounting the signals took part in.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from chatcore import CallSignal, Config, Mode, Receive, SignalKind, redact_command, replay
from chatcore_sim import Simulation

SDP = (
    "v=0\r\no=- 4611731400430051336 2 IN IP4 203.0.113.9\r\ns=-\r\nt=0 0\r\n"
    "a=ice-ufrag:Wq7v\r\na=ice-pwd:s3cr3tIcePassw0rdForTheCall\r\n"
    "a=fingerprint:sha-256 4A:AD:B9:B1:3F:82:18:3B:54:02:12:DF:3E:5D:49:6B\r\n"
    "m=video 9 UDP/TLS/RTP/SAVPF 96 — é 😀\r\n"
)
ANSWER = SDP.replace("203.0.113.9", "198.51.100.4").replace("Wq7v", "Zk2p")
CANDIDATES = [
    f"candidate:84216304{i} 1 udp 1677729535 192.0.2.{i} 5123{i} typ srflx raddr 0.0.0.0 rport 0"
    for i in range(8)
]
SECRETS = ["203.0.113.9", "198.51.100.4", "s3cr3tIcePassw0rd", "4A:AD:B9", "192.0.2.", "Wq7v"]


def a_call(config: Config | None = None, **kw: Any) -> tuple[list[str], Simulation]:
    """A call from alice to bob's two tabs, answered on one, candidates both ways,
    one SDP too large, a burst over the signal limit, a hangup; its record."""
    lines: list[str] = []
    sim = Simulation(
        config or Config(max_sdp_bytes=4096, signal_burst=12), seed=3, record=lines.append, **kw
    )
    alice = sim.connect("alice", "lobby")
    bob1 = sim.connect("bob", "lobby")
    bob2 = sim.connect("bob", "lobby")
    sim.advance(0.1)
    alice.signal("call", "c1", to="bob", video=True)
    alice.signal("offer", "c1", sdp=SDP)
    alice.signal("offer", "c1", sdp="é" * 2049)  # 4,098 bytes: too large, refused
    for cand in CANDIDATES[:4]:
        alice.signal("candidate", "c1", candidate=cand, mid="0", index=0)
    sim.advance(0.5)
    bob2.signal("answer", "c1", sdp=ANSWER)
    for cand in CANDIDATES[4:]:
        bob2.signal("candidate", "c1", candidate=cand, mid="0", index=0)
    # A raw frame with the payload escaped another way, and extra spaces.
    bob2.send_raw(
        '{ "type" : "candidate", "call":"c1", "candidate" : '
        + json.dumps(CANDIDATES[7], ensure_ascii=True).replace("1", "\\u0031")
        + ' , "mid":"0", "index": 0 }'
    )
    for _ in range(20):  # past the signal burst: rate_limited, as recorded
        alice.signal("candidate", "c1", candidate=CANDIDATES[0], mid="0", index=0)
    sim.advance(1)
    alice.signal("connected", "c1")
    alice.signal("hangup", "c1")
    sim.advance(1)
    assert bob2.calls("c1")[-1]["reason"] == "hangup"
    assert any(e.get("sdp") == SDP for e in bob1.calls("c1"))  # it was relayed for real
    assert any(e.get("code") == "too_large" for e in alice.of_type("error"))
    assert any(e.get("code") == "rate_limited" for e in alice.of_type("error"))
    return lines, sim


def test_a_recorded_call_holds_no_sdp_nor_candidate_and_replays_identically() -> None:
    lines, _ = a_call()
    record = "\n".join(lines).encode("utf-8", "surrogatepass")
    for secret in [*SECRETS, *CANDIDATES]:
        assert secret.encode() not in record, secret
        assert json.dumps(secret)[1:-1].encode() not in record, secret
    # The frames are still there, with a filler where their payload was.
    frames = [
        json.loads(json.loads(line)["cmd"]["text"])
        for line in lines[1:]
        if json.loads(line).get("cmd", {}).get("type") == "Receive"
    ]
    offers = [f for f in frames if f.get("type") == "offer"]
    assert [len(f["sdp"].encode()) for f in offers] == [len(SDP.encode()), 4098]
    assert replay(lines) is None


def test_a_replay_with_a_changed_limit_still_diverges_where_it_should() -> None:
    lines, _ = a_call()
    divergence = replay(lines, override={"max_sdp_bytes": 16384})
    assert divergence is not None  # the oversized offer is now relayed: the filler counts
    assert isinstance(divergence.command, Receive)
    assert json.loads(divergence.command.text)["type"] == "offer"


def test_a_plain_text_line_that_looks_like_a_call_frame_is_a_chat_message_and_is_kept() -> None:
    lines: list[str] = []
    sim = Simulation(seed=1, record=lines.append)
    watcher = sim.connect("amy", "lobby")
    texter = sim.connect("ted", "lobby", mode=Mode.TEXT)
    sim.advance(0.1)
    line = json.dumps({"type": "offer", "call": "c1", "sdp": "v=0 not a call"})
    texter.send_raw(line)
    sim.advance(0.5)
    assert watcher.texts() == [line]
    assert any("v=0 not a call" in rec for rec in lines)
    assert replay(lines) is None


def test_a_call_signal_fed_by_the_host_is_recorded_without_its_payload() -> None:
    lines: list[str] = []
    sim = Simulation(seed=2, record=lines.append)
    alice = sim.connect("alice", "lobby")
    bob = sim.connect("bob", "lobby")
    sim.advance(0.1)
    assert alice.conn is not None
    assert bob.conn is not None
    sim.feed(CallSignal(conn=alice.conn, call="h1", kind=SignalKind.CALL, to="bob"))
    sim.feed(CallSignal(conn=alice.conn, call="h1", kind=SignalKind.OFFER, sdp=SDP))
    sim.feed(
        CallSignal(conn=alice.conn, call="h1", kind=SignalKind.CANDIDATE, candidate=CANDIDATES[1])
    )
    sim.advance(0.1)
    assert [e["type"] for e in bob.calls("h1")] == ["call", "offer", "candidate"]
    record = "\n".join(lines)
    for secret in [*SECRETS, CANDIDATES[1]]:
        assert secret not in record
    assert replay(lines) is None


# -- the redaction itself, for any payload and any way of writing the frame -------------

payloads = st.text(
    st.characters(codec="utf-8") | st.sampled_from('"\\\r\n\t\b\f\x00\x1f\x7f/é€😀\udc00'),
    max_size=40,
)


def sizes(value: str) -> tuple[int, int, int]:
    """Characters, UTF-8 bytes, and the length the codec encodes it to."""
    utf8 = "utf-8", "surrogatepass"  # a lone surrogate (refused by the codec) counts too
    return (
        len(value),
        len(value.encode(*utf8)),
        len(json.dumps(value, ensure_ascii=False).encode(*utf8)),
    )


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(["offer", "answer", "candidate"]),
    payload=payloads,
    ascii_only=st.booleans(),
    spaces=st.sampled_from(["", " ", "\n\t "]),
)
def test_a_redacted_frame_is_the_same_frame_but_for_its_payload(
    kind: str, payload: str, ascii_only: bool, spaces: str
) -> None:
    # Invariant: same length in characters, decodes to the same object except
    # the payload, whose filler has the payload's sizes and none of its content
    # beyond its character classes; redacting twice changes nothing more.
    key = "candidate" if kind == "candidate" else "sdp"
    sep = f"{spaces},{spaces}"
    text = (
        "{"
        + sep.join(
            f"{json.dumps(k)}{spaces}:{spaces}{json.dumps(v, ensure_ascii=ascii_only)}"
            for k, v in {"type": kind, "call": "c1", key: payload, "mid": "0"}.items()
        )
        + "}"
    )
    frame = Receive(conn=1, text=text)
    redacted = redact_command(frame)
    assert isinstance(redacted, Receive)
    assert len(redacted.text) == len(text)
    before, after = json.loads(text), json.loads(redacted.text)
    filler = after.pop(key)
    assert after == {k: v for k, v in before.items() if k != key}
    assert sizes(filler) == sizes(payload)
    assert set(filler) <= set("x\n\x01\ud800\u00e9\ufffd\U00010000")
    assert redact_command(redacted) == redacted
    assert redact_command(frame, Mode.TEXT) is frame  # a chat line, not a call frame


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | payloads,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(payloads, inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(
    fields=st.dictionaries(
        st.sampled_from(["type", "call", "sdp", "candidate", "mid", "index"]) | payloads,
        json_values | st.sampled_from(["offer", "answer", "candidate", "c1"]),
        max_size=6,
    ),
    junk=st.sampled_from(["", "}", "{", " [", "\\"]),
)
def test_any_frame_is_recorded_at_its_length_and_never_breaks_the_recorder(
    fields: dict[str, Any], junk: str
) -> None:
    # Invariant: whatever a client sends (valid JSON of any shape, or not JSON),
    # the recorder neither raises nor changes the frame's length, and the frame
    # decodes as before but for string payloads of a call frame.
    text = json.dumps(fields, ensure_ascii=False) + junk
    redacted = redact_command(Receive(conn=1, text=text))
    assert isinstance(redacted, Receive)
    assert len(redacted.text) == len(text)
    if redacted.text != text:
        before, after = json.loads(text), json.loads(redacted.text)
        assert before["type"] in ("offer", "answer", "candidate")
        for key in ("sdp", "candidate"):
            if isinstance(before.get(key), str):
                assert sizes(after.pop(key)) == sizes(before.pop(key))
        assert after == before
