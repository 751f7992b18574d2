"""A connect URL's query is read directly when nothing in it is escaped, and by
``urllib.parse.parse_qsl`` otherwise (``parse_connect``).

Invariant: escaping a query's characters (``%XX``) changes nothing, so the
direct reading and ``parse_qsl``'s agree: the same ``Connect``, or the same
refusal.
"""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from chatcore import Connect, HandshakeError, Mode, parse_connect

# The characters a query is made of, '&' and '=' among them (no '%' or '+', which
# are escapes themselves: a query with them is read by parse_qsl in any case).
_piece = st.text(alphabet="ab:09_-.&=;! ~", max_size=12)
_field = st.builds(
    lambda k, v: f"{k}={v}",
    st.sampled_from(["user", "room", "resume", "offset", "epoch", "other", ""]),
    _piece,
)
_query = st.lists(st.one_of(_field, _piece), max_size=6).map("&".join)


def _escaped(query: str) -> str:
    """``query`` with every character but the separators written as ``%XX``."""
    return "".join(c if c in "&=" else f"%{ord(c):02X}" for c in query)


def _outcome(query: str) -> Connect | tuple[int, str]:
    try:
        return parse_connect(1, query, Mode.JSON)
    except HandshakeError as exc:
        return exc.status, exc.reason


@settings(max_examples=500, deadline=None)
@given(_query)
@example("user=ann&room=lobby&room=tech&offset=lobby:4&epoch=lobby:e1&resume=tok")
@example("user=ann&&room=lobby&")
@example("user=ann&room")
@example("user=a=b")
@example("room=lobby")
def test_escaping_a_query_changes_nothing(query: str) -> None:
    assert _outcome(query) == _outcome(_escaped(query))


def test_a_plus_is_a_space_and_an_escape_is_its_character() -> None:
    assert parse_connect(1, "user=a%62c&room=x", Mode.JSON).user == "abc"
    with pytest.raises(HandshakeError, match="'x y'"):  # '+' read as a space
        parse_connect(1, "user=ann&room=x+y", Mode.JSON)
