"""Start chatcore's server for the benchmark: the standard ``ChatServer``, with
the per-session send rate limit lifted (a benchmark sender sends hundreds of
messages per second) and history in memory or in SQLite.

    python -m benchmarks.chatcore_launch --port 8765 [--db memory|sqlite:///PATH]
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import fields
from typing import Any

import anyio

from chatcore import Config
from chatcore_server import ChatServer
from chatcore_store import HistoryStore, MemoryStore


def store_for(db: str) -> HistoryStore:
    if db == "memory":
        return MemoryStore()
    if db.startswith("sqlite:///"):
        from chatcore_store.sqlite import SQLiteStore

        return SQLiteStore(db.removeprefix("sqlite:///"))
    raise SystemExit(f"unknown --db {db!r}")


def unlimited_config() -> Config:
    """Every per-session rate limit lifted (send rate, request rate, ...): the
    benchmark's few senders each send hundreds of messages per second on purpose."""
    unlimited: dict[str, Any] = {
        f.name: (1_000_000 if f.type in (int, "int") else 1_000_000.0)
        for f in fields(Config)
        if f.name.endswith(("_burst", "_per_second"))
    }
    return Config(**unlimited)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chatcore_launch")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--db", default="memory")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    config = unlimited_config()
    server = ChatServer(config=config, store=store_for(args.db), host=args.host, port=args.port)
    print(f"listening on {args.host}:{args.port}", flush=True)
    anyio.run(server.serve, backend="asyncio")


if __name__ == "__main__":
    main()
