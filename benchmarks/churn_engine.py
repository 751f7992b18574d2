"""The engine's connect+close path in process, for callgrind and cProfile.

    PYTHONHASHSEED=0 valgrind --tool=callgrind python benchmarks/churn_engine.py 400
    python benchmarks/churn_engine.py 2000 --trace      # + what stayed allocated (tracemalloc)

100 members in ``room0``, then 200 warm-up cycles, then N cycles of users
never seen before: each connects, gets its welcome, closes with 1000. A
``MemoryStore`` answers at once and every delivery's write is reported back
(``Written``), as a host does. Instructions per cycle: the run with N minus
the run with 0, divided by N. Prints the engine's stats before and after.
"""

from __future__ import annotations

import gc
import sys
import time
import tracemalloc
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent / d) for d in ("src", "adapters")]

from chatcore import (  # noqa: E402
    Command,
    Config,
    Connect,
    Deliver,
    Disconnected,
    Engine,
    SeededIds,
    Written,
)
from chatcore_store import MemoryStore, is_storage_effect  # noqa: E402


def run(n: int, *, members: int = 100, trace: bool = False) -> None:
    engine = Engine(Config(), SeededIds(0))
    store = MemoryStore()
    now = 1000.0

    def feed(command: Command) -> None:
        queue = [command]
        while queue:
            effects = engine.handle(queue.pop(0), now)
            queue.extend(store.execute_now([e for e in effects if is_storage_effect(e)]))
            for effect in effects:
                if isinstance(effect, Deliver):
                    queue.extend(Written(conn=c, frames=1, nbytes=effect.size) for c in effect.to)
            due = engine.next_deadline()
            if not queue and due is not None and due <= now:  # the host's one timer
                effects = engine.tick(now)
                for effect in effects:
                    if isinstance(effect, Deliver):
                        queue.extend(
                            Written(conn=c, frames=1, nbytes=effect.size) for c in effect.to
                        )

    for i in range(members):
        feed(Connect(conn=i + 1, user=f"member{i}", rooms=("room0",)))
    conn = members

    def cycle(k: int) -> None:
        nonlocal conn, now
        conn += 1
        feed(Connect(conn=conn, user=f"churn{k}", rooms=("room0",)))
        feed(Disconnected(conn=conn, code=1000))
        now += 0.001

    for k in range(200):
        cycle(k)
    gc.collect()
    if trace:
        tracemalloc.start()
    before = tracemalloc.take_snapshot() if trace else None
    stats = engine.stats()
    t0 = time.perf_counter()
    for k in range(200, 200 + n):
        cycle(k)
    wall = time.perf_counter() - t0
    gc.collect()
    print("before", stats)
    print("after ", engine.stats())
    if n:
        print(f"{n} cycles, {n / wall:,.0f}/s (in process, not a benchmark of the server)")
    if before is not None:
        for diff in tracemalloc.take_snapshot().compare_to(before, "lineno")[:10]:
            print(diff)


if __name__ == "__main__":
    run(int(sys.argv[1]) if len(sys.argv) > 1 else 400, trace="--trace" in sys.argv)
