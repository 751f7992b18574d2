"""CPU per message fanned out to a room of 1,000 members, with and without
``Config(cluster=True)``: what the several-process machinery costs the engine
on its hot path (bus and log not included).

    python benchmarks/cluster_overhead.py
"""

from __future__ import annotations

import time

from chatcore import (
    Appended,
    Config,
    Connect,
    Drained,
    Engine,
    InboxLoaded,
    LoadInbox,
    LoadRoom,
    Message,
    RoomLoaded,
    SeededIds,
)

MEMBERS = 1000
MESSAGES = 3000


def run(cluster: bool) -> float:
    engine = Engine(Config(cluster=cluster), SeededIds(1))
    now = 1000.0
    for conn in range(MEMBERS):
        out = engine.handle(Connect(conn=conn, user=f"u{conn}", rooms=("big",)), now)
        for e in out:
            if isinstance(e, LoadRoom):
                engine.handle(RoomLoaded(room="big", epoch="e", head=0), now)
            elif isinstance(e, LoadInbox):
                engine.handle(InboxLoaded(ref=e.ref, rooms=()), now)
    conns = tuple(range(MEMBERS))
    start = time.process_time()
    for offset in range(1, MESSAGES + 1):
        m = Message(room="big", offset=offset, epoch="e", sender="u1", text="hello", ts=1)
        engine.handle(Appended(message=m), now)
        engine.handle(Drained(conns=conns), now)
    return (time.process_time() - start) / MESSAGES


def main() -> None:
    for _ in range(2):  # the second round is the one to read
        off, on = run(False), run(True)
    print(
        f"{MEMBERS} members: {off * 1e6:.0f} us/message alone, {on * 1e6:.0f} us/message "
        f"with cluster on ({on / off:.3f}x)"
    )


if __name__ == "__main__":
    main()
