"""``format_ts`` formats the date once per second and caches it: the cache must
never show.

Invariant: for any sequence of calls, each result equals the plain strftime
formatting of its own argument (a second's text never leaks into another's).
"""

from __future__ import annotations

import datetime

from hypothesis import given
from hypothesis import strategies as st

from chatcore import format_ts

LAST_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z


def plain(ms: int) -> str:
    seconds, millis = divmod(ms, 1000)
    moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{millis:03d}Z"


@given(
    st.lists(
        st.one_of(
            st.integers(0, LAST_MS),
            # Near one second boundary, so that neighbours share or just miss a second.
            st.integers(1_763_762_399_990, 1_763_762_400_010),
        ),
        min_size=1,
        max_size=30,
    )
)
def test_each_stamp_is_its_own_second_formatted(stamps: list[int]) -> None:
    for ms in stamps:
        assert format_ts(ms) == plain(ms)


def test_the_edges() -> None:
    assert format_ts(0) == "1970-01-01T00:00:00.000Z"
    assert format_ts(999) == "1970-01-01T00:00:00.999Z"
    assert format_ts(1000) == "1970-01-01T00:00:01.000Z"
    assert format_ts(LAST_MS) == "9999-12-31T23:59:59.999Z"
    assert format_ts(1_763_762_400_007) == "2025-11-21T22:00:00.007Z"
