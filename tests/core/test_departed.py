"""Everything the engine holds, walked: a user who did everything and left costs nothing.

``tests/core/test_presence.py`` names the dicts it checks; this test does not
choose. It measures every container the engine's state objects hold (the
state, its awaited answers, calls, counters, each room in memory, the timer
heap) by walking their attributes, so a dict added later is measured too.
Distinct users each send, write to someone away, mark read, type, ring a
call and close; after hundreds of them every size is back at its start.

The one documented exception (docs/engine.md, "A user who has left costs
nothing"): a room's read marks stay in memory while the room is held.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from chatcore import Config
from chatcore_sim import SimClient, Simulation

EXCEPTIONS = {"room[hall].reads"}


def sizes_of(prefix: str, obj: Any, into: dict[str, int]) -> None:
    names = [*getattr(type(obj), "__slots__", ()), *getattr(obj, "__dict__", {})]
    for name in names:
        value = getattr(obj, name, None)
        if isinstance(value, dict | list | set | deque):
            into[f"{prefix}.{name}"] = len(value)


def holdings(sim: Simulation) -> dict[str, int]:
    """The length of every container the engine holds, by where it is held."""
    st = sim.engine._st  # the test reaches in on purpose: nothing here may grow
    into: dict[str, int] = {"timers": st.timers.size()}
    for prefix, obj in (
        ("state", st),
        ("awaits", st.awaits),
        ("calls", st.calls),
        ("counters", st.counters),
    ):
        sizes_of(prefix, obj, into)
    for name, room in st.rooms.items():
        sizes_of(f"room[{name}]", room, into)
    return {k: v for k, v in into.items() if k not in EXCEPTIONS}


def visit(sim: Simulation, i: int, host: SimClient) -> None:
    """A user never seen before does a bit of everything, then closes with 1000."""
    guest = sim.connect(f"guest{i}", room="hall")
    guest.send(f"hello {i}")
    guest.dm("away", f"psst {i}")  # to someone offline: the room is the guest's alone
    guest.typing("hall")
    guest.read(1, "hall")
    guest.signal("call", f"c{i}", to=host.user)
    sim.advance(0.01)
    sim.close(guest)
    sim.advance(0.01)


def test_a_user_who_did_everything_and_left_leaves_nothing_behind() -> None:
    # A window of 20 messages, full after the warm-up: it is bounded by configuration.
    sim = Simulation(Config(history_window=20), seed=7)
    members = [sim.connect(f"m{i}", room="hall") for i in range(60)]  # a crowd
    host = members[0]
    for i in range(30):  # warm-up: what is kept once is kept now
        visit(sim, i, host)
    sim.advance(40)  # every ring, grace period and indicator has run out
    before = holdings(sim)
    for i in range(30, 330):
        visit(sim, i, host)
    sim.advance(40)
    after = holdings(sim)
    assert {k: (before.get(k), v) for k, v in after.items() if before.get(k) != v} == {}
    assert after.keys() == before.keys()
    assert all(m.connected for m in members)
    # The guests did reach the room and the host: their messages and rings arrived.
    assert any(m["text"] == "hello 329" for m in host.messages("hall"))
    assert any(e["call"] == "c329" for e in host.calls())
    assert len(sim.store.messages("dm:away:guest329")) == 1


def test_a_flaky_link_that_drops_and_resumes_leaves_few_dead_timers() -> None:
    # Each drop arms a grace timer, which its resume leaves dead in the heap until
    # it would have come due (30 s): the engine counts it, and drops the dead ones
    # once they are most of the heap (src/chatcore/_timers.py).
    sim = Simulation(seed=8)
    flaky = sim.connect("flaky", room="hall")
    others = [sim.connect(f"o{i}", room="hall") for i in range(3)]
    for _ in range(200):
        sim.drop(flaky)
        sim.advance(0.01)
        sim.resume(flaky)
        sim.advance(0.01)
    assert flaky.connected
    assert all(o.connected for o in others)
    live = 4  # one heartbeat per connection
    assert sim.engine.stats()["timers"] < 2 * live + 64  # docs/engine.md: dead < live + 64
