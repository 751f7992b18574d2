"""The request decoder hands a frame that looks like one JSON object straight to
the scanner that ``json.loads`` uses, without ``loads``' own checks around it.

Invariant: for any text, the decoder's parse gives what ``json.loads`` gives (the
same value, or an error where ``loads`` raises one), so whatever a client sends,
``decode_request`` answers as it did with ``json.loads``. The plain model is
``json.loads``; the texts are built to sit on the fast path's edges: an object
followed by more (another object, whitespace, a brace), whitespace or a byte
order mark before it, braces inside strings, broken escapes, deep nesting.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatcore import FrameError, decode_request
from chatcore._codec import _loads

values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True)
    | st.text(st.characters(codec=None, exclude_categories=()), max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=10,
)
objects = st.dictionaries(st.text(max_size=6), values, max_size=4).map(json.dumps)
around = st.sampled_from(["", " ", "\n", "\t", "\ufeff", "}", "{}", "{", ",", "x", "\\", '"'])
texts = st.one_of(
    objects,
    st.tuples(around, objects, around).map("".join),
    st.tuples(objects, objects).map("".join),
    # Braces at both ends around anything: the fast path's whole test.
    st.text(st.sampled_from('{}[]":,\\ ab01\nu'), max_size=30).map(lambda t: "{" + t + "}"),
    st.text(max_size=30).map(lambda t: "{" + t + "}"),
    st.text(max_size=30),
)


def outcome(parse: Any, text: str) -> tuple[str, str]:
    try:
        return "value", repr(parse(text))  # (repr: a NaN equals itself there)
    except (ValueError, RecursionError) as exc:
        return "error", type(exc).__name__


@given(texts)
def test_the_fast_parse_is_json_loads(text: str) -> None:
    assert outcome(_loads, text) == outcome(json.loads, text)


@given(texts)
def test_requests_decode_as_with_json_loads(text: str) -> None:
    def decoded(text: str) -> tuple[str, str]:
        try:
            return "request", repr(decode_request(7, text))
        except FrameError as exc:
            return "error", f"{exc.code} {exc.message} {exc.ref}"

    fast = decoded(text)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("chatcore._codec._loads", json.loads)
        assert fast == decoded(text)


@pytest.mark.parametrize(
    "text",
    [
        '{"type":"send","room":"general","text":"hi"}',
        '{"type":"send"} ',
        ' {"type":"send"}',
        "\ufeff{}",
        "{}{}",
        '{"a":"}"}',
        '{"a":1}}',
        "{" * 100_000 + "}" * 100_000,
        '{"a":"\\ud800"}',
        "{",
        "}",
        "{}",
    ],
)
def test_edges(text: str) -> None:
    assert outcome(_loads, text) == outcome(json.loads, text)
