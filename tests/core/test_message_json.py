"""A chat message's frame and its ack are written out by hand (``encode_json``'s
fast path): they must be the frames the general encoder makes of the same events.

Invariant: for any message or ack, ``encode_json`` gives exactly the string that
``json.dumps`` (compact, not ASCII-only) makes of ``event_to_dict`` of it, and
that string decodes back to the same fields. The plain model is the dict.
"""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from chatcore import Ack, Message, encode_json, event_to_dict

LAST_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z

# Any string, lone surrogates and control characters included (the escaping is the point).
texts = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)

messages = st.builds(
    Message,
    room=texts,
    offset=st.integers(0, 2**53 - 1),
    epoch=texts,
    sender=texts,
    text=st.one_of(texts, texts.map(lambda t: "\x01e2e:" + t)),  # encrypted too
    ts=st.integers(0, LAST_MS),
    client_id=st.one_of(st.none(), texts),
    deleted=st.booleans(),
)


acks = st.builds(
    Ack,
    room=texts,
    offset=st.integers(0, 2**53 - 1),
    epoch=texts,
    client_id=st.one_of(st.none(), texts),
)


def general(m: Message | Ack) -> str:
    return json.dumps(event_to_dict(m), ensure_ascii=False, separators=(",", ":"))


@given(st.one_of(messages, acks))
def test_a_message_or_ack_frame_is_the_general_encoders(m: Message | Ack) -> None:
    assert encode_json(m) == general(m)


@given(messages)
def test_a_plain_message_frame_decodes_to_its_fields(m: Message) -> None:
    obj = json.loads(encode_json(m))
    fields = (obj["room"], obj["offset"], obj["epoch"], obj["from"], obj["id"])
    assert fields == (m.room, m.offset, m.epoch, m.sender, m.client_id)


def test_escaping_of_quotes_controls_and_non_ascii() -> None:
    m = Message(room="r", offset=7, epoch="e", sender='a"b', text='x\n\t"\\\u2028é😀\x00', ts=0)
    assert encode_json(m) == general(m)
    assert json.loads(encode_json(m))["text"] == m.text
