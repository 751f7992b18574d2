"""Messages persisted per second by the history stores, with group commit.

    python -m benchmarks.store_bench [--messages N] [--batch B] [--pg URL] [--only sqlite|postgres]

Each run appends N messages (each with a client id, as resumable clients send
them) in ``execute`` batches of B appends: one transaction per batch. It runs
one room and 100 rooms (round robin), for SQLite with ``synchronous=FULL``
(the default: survives power loss) and ``NORMAL`` (survives a crash of the
process), and for PostgreSQL in a throwaway schema. A batch of one shows what
group commit buys. Numbers are wall-clock on this machine, asyncio backend,
the best and the median of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from chatcore import Append, Appended, LoadRoom
from chatcore_store import HistoryStore

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
T0 = 1_795_000_000_000


async def persist(store: HistoryStore, *, messages: int, batch: int, rooms: int) -> float:
    """Append ``messages`` in batches; returns messages per second."""
    await store.execute([LoadRoom(room=f"r{i}", recent=0) for i in range(rooms)])
    effects = [
        Append(
            ref=n,
            room=f"r{n % rooms}",
            sender=f"u{n % 7}",
            text=f"message {n} " + "x" * 60,
            ts=T0 + n,
            client_id=f"c{n}",
        )
        for n in range(messages)
    ]
    start = time.perf_counter()
    for lo in range(0, messages, batch):
        answers = await store.execute(effects[lo : lo + batch])
        if not all(isinstance(a, Appended) and not a.duplicate for a in answers):
            raise RuntimeError(f"a batch was not stored: {answers[:3]}")
    return messages / (time.perf_counter() - start)


async def run(args: argparse.Namespace) -> int:
    from chatcore_store.sqlite import SQLiteStore

    Factory = Callable[[], Awaitable[tuple[HistoryStore, Callable[[], Awaitable[None]]]]]
    kinds: list[tuple[str, Factory]] = []
    tmp = Path(tempfile.mkdtemp(prefix="chatcore-bench-"))

    def sqlite(sync: str) -> Factory:
        async def make() -> tuple[HistoryStore, Callable[[], Awaitable[None]]]:
            store = SQLiteStore(tmp / f"{secrets.token_hex(4)}.db", synchronous=sync)
            await store.open()
            return store, store.close

        return make

    async def postgres() -> tuple[HistoryStore, Callable[[], Awaitable[None]]]:
        from chatcore_store.postgres import PostgresStore

        store = PostgresStore(args.pg, schema=f"bench_{secrets.token_hex(4)}")
        await store.open()

        async def done() -> None:
            await store.drop_schema()
            await store.close()

        return store, done

    if args.only in (None, "sqlite"):
        kinds += [("sqlite FULL", sqlite("FULL")), ("sqlite NORMAL", sqlite("NORMAL"))]
    if args.only in (None, "postgres"):
        kinds.append(("postgresql", postgres))

    print(f"best and median of {args.repeat} runs, each on a fresh database")
    print(
        f"{'store':<15} {'rooms':>5} {'batch':>5} {'messages':>8} {'best msg/s':>11} {'median':>8}"
    )
    for name, make in kinds:
        for rooms in (1, 100):
            for batch, count in ((args.batch, args.messages), (1, args.messages_single)):
                rates = []
                for _ in range(args.repeat):
                    store, done = await make()
                    try:
                        rates.append(await persist(store, messages=count, batch=batch, rooms=rooms))
                    finally:
                        await done()
                best, median = max(rates), statistics.median(rates)
                print(
                    f"{name:<15} {rooms:>5} {batch:>5} {count:>8} {best:>11,.0f} {median:>8,.0f}",
                    flush=True,
                )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000, help="messages per grouped run")
    parser.add_argument(
        "--messages-single", type=int, default=1_000, help="messages per one-by-one run"
    )
    parser.add_argument("--batch", type=int, default=100, help="appends per execute")
    parser.add_argument("--repeat", type=int, default=3, help="runs per line (noisy machines)")
    parser.add_argument("--pg", default=PG_URL, help="PostgreSQL URL")
    parser.add_argument("--only", choices=["sqlite", "postgres"])
    return asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
