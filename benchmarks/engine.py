"""The engine alone: one room of N members, no sockets, no event loop.

    python -m benchmarks.engine [--members 1000] [--messages 2000] [--repeat 5]

Each message goes the whole way a real server takes it: a JSON frame from a
sender is decoded, the engine asks the log to append it (MemoryStore answers
at once), the answer fans out as one Deliver to every other member, and the
adapter reports the write back (one WrittenMany per message). Prints messages
handled per second, deliveries per second and the cost per delivery; the
median of ``--repeat`` runs. A regression in the core shows here without the
network in the way.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

from chatcore import Config, Connect, Deliver, Engine, Receive, SeededIds, WrittenMany
from chatcore_store import MemoryStore, is_storage_effect


def run_once(members: int, messages: int, senders: int) -> tuple[float, int]:
    """Seconds taken and deliveries made for ``messages`` messages."""
    config = Config(
        rate_burst=10**9,
        rate_per_second=1e9,
        request_burst=10**9,
        request_per_second=1e9,
        history_window=1000,
    )
    engine = Engine(config, SeededIds(1))
    store = MemoryStore()
    now = 1_800_000_000.0

    def settle(effects: list[object]) -> int:
        """Carry out effects like an adapter; return deliveries made."""
        delivered = 0
        pending = list(effects)
        while pending:
            batch, pending = pending, []
            written: list[tuple[int, int, int]] = []
            storage = []
            for effect in batch:
                if isinstance(effect, Deliver):
                    delivered += len(effect.to)
                    written.extend((c, 1, effect.size) for c in effect.to)
                elif is_storage_effect(effect):
                    storage.append(effect)
            for answer in store.execute_now(storage):
                pending += engine.handle(answer, now)
            if written:
                pending += engine.handle(WrittenMany(reports=tuple(written)), now)
        return delivered

    for conn in range(members):
        settle(engine.handle(Connect(conn=conn, user=f"user{conn}", rooms=("lobby",)), now))
    frames = [
        json.dumps({"type": "send", "room": "lobby", "text": f"message {i:06d} " + "x" * 80})
        for i in range(messages)
    ]
    start = time.perf_counter()
    delivered = 0
    for i, frame in enumerate(frames):
        delivered += settle(engine.handle(Receive(conn=i % senders, text=frame), now))
    elapsed = time.perf_counter() - start
    assert len(store.messages("lobby")) == messages, "every message must be stored"
    return elapsed, delivered


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args(argv)
    runs = [run_once(args.members, args.messages, args.senders) for _ in range(args.repeat)]
    seconds = statistics.median(r[0] for r in runs)
    deliveries = runs[0][1]
    result = {
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "members": args.members,
        "messages": args.messages,
        "messages_per_s": args.messages / seconds,
        "deliveries_per_s": deliveries / seconds,
        "us_per_delivery": seconds / deliveries * 1e6,
        "us_per_message": seconds / args.messages * 1e6,
    }
    print(
        f"engine only, 1 room x {args.members} members, {args.messages} messages, "
        f"median of {args.repeat} (Python {result['python']})"
    )
    print(f"  messages handled/s   {result['messages_per_s']:>12,.0f}")
    print(f"  deliveries/s         {result['deliveries_per_s']:>12,.0f}")
    print(f"  us per delivery      {result['us_per_delivery']:>12.3f}")
    print(f"  us per message       {result['us_per_message']:>12.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
