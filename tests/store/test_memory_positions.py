"""MemoryStore keeps the read positions of at most ``max_position_users`` users.

A server on the memory store that sees thousands of distinct users must not
grow with each of them (issue 15: ~290 B per departed user). The bound
forgets whole users, those saved longest ago first; what it keeps is exactly
what an unbounded store would hold for them since they last came back.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatcore import LoadRoom, Position, RoomLoaded, SavePositions
from chatcore_store import MemoryStore


def save(user: str, *marks: tuple[str, int, int]) -> SavePositions:
    return SavePositions(
        user=user, positions=tuple(Position(room=r, delivered=d, read=n) for r, d, n in marks)
    )


def test_the_user_saved_longest_ago_is_forgotten_first() -> None:
    store = MemoryStore(max_position_users=2)
    store.execute_now([save("alice", ("a", 3, 2), ("b", 1, 1)), save("bob", ("a", 4, 4))])
    store.execute_now([save("alice", ("a", 5, 2))])  # alice is the newest now
    store.execute_now([save("carol", ("a", 1, 0))])  # bob goes
    assert store.positions_by_key == {
        ("alice", "a"): (5, 2),
        ("alice", "b"): (1, 1),
        ("carol", "a"): (1, 0),
    }
    [loaded] = store.execute_now([LoadRoom(room="a", recent=0)])
    assert isinstance(loaded, RoomLoaded)
    assert loaded.reads == {"alice": 2}  # bob's mark went with him


def test_a_forgotten_user_comes_back_as_a_new_one() -> None:
    store = MemoryStore(max_position_users=1)
    store.execute_now([save("alice", ("a", 9, 9)), save("bob", ("a", 1, 1))])
    store.execute_now([save("alice", ("a", 2, 0))])
    assert store.positions_by_key == {("alice", "a"): (2, 0)}  # not (9, 9): forgotten


def test_no_bound_keeps_everyone_and_a_bound_below_one_is_refused() -> None:
    store = MemoryStore(max_position_users=None)
    store.execute_now([save(f"u{i}", ("a", i, 0)) for i in range(2000)])
    assert len(store.positions_by_key) == 2000
    with pytest.raises(ValueError, match="max_position_users"):
        MemoryStore(max_position_users=0)


def test_the_default_bound_holds_over_thousands_of_departed_users() -> None:
    store = MemoryStore()
    assert store.max_position_users == 1000
    for i in range(5000):
        store.execute_now([save(f"churn{i}", ("room0", 7, 0))])
    assert len(store.positions_by_key) == 1000
    assert ("churn4999", "room0") in store.positions_by_key
    assert ("churn3999", "room0") not in store.positions_by_key


USERS = st.sampled_from(["ann", "bob", "cy", "dee", "eve"])
MARKS = st.tuples(st.sampled_from(["a", "b", "dm:ann:bob"]), st.integers(0, 9), st.integers(0, 9))


@given(
    bound=st.integers(1, 4),
    saves=st.lists(st.tuples(USERS, st.lists(MARKS, min_size=1, max_size=3)), max_size=40),
)
def test_the_bounded_store_holds_what_an_unbounded_one_would_for_the_newest_users(
    bound: int, saves: list[tuple[str, list[tuple[str, int, int]]]]
) -> None:
    # Invariant, against a plain model (a list of every save): the store holds the
    # rows of exactly the `bound` users whose last save is the most recent, and
    # each user's rows are the furthest marks of their saves since the last time
    # they were not among those users (their "comeback"); a room loads their reads.
    store = MemoryStore(max_position_users=bound)
    for user, marks in saves:
        store.execute_now([save(user, *marks)])
    last = {user: i for i, (user, _) in enumerate(saves)}
    kept = sorted(last, key=last.__getitem__)[-bound:]
    expected: dict[tuple[str, str], tuple[int, int]] = {}
    for user in kept:
        # Walk back from the user's last save while they stayed among the newest.
        start = last[user]
        while start > 0:
            prev = [i for i in range(start) if saves[i][0] == user]
            if not prev:
                break
            between = {u for u, _ in saves[prev[-1] + 1 : start + 1]} - {user}
            # Forgotten between its previous save and this one: `bound` other users
            # saved in between (each pushed it one place back).
            if len(between) >= bound:
                break
            start = prev[-1]
        for u, marks in saves[start:]:
            if u != user:
                continue
            for room, d, r in marks:
                was = expected.get((user, room), (0, 0))
                expected[user, room] = (max(was[0], d), max(was[1], r))
    assert store.positions_by_key == expected
    [loaded] = store.execute_now([LoadRoom(room="a", recent=0)])
    assert isinstance(loaded, RoomLoaded)
    assert loaded.reads == {u: r for (u, room), (_, r) in expected.items() if room == "a" and r}
