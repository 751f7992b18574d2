"""A burst of big messages into one room closes nobody who reads.

Five senders each send their burst of ten 40 KB messages (within the default
rate limit) at once. With a store that answers in batches (SQLite, PostgreSQL:
group commit), the 50 messages reach the engine as one batch: 2 MB for every
member, twice the 1 MiB outbox. Readers that keep up, in a process of their
own, and the senders must get every message in order and stay connected.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.streams.text import TextReceiveStream

from chatcore import Config
from chatcore_store import HistoryStore, MemoryStore

from .conftest import GUARD, JSON, recv, serving, welcome, ws_connect

pytestmark = pytest.mark.anyio

SENDERS, BURST, READERS = 5, 10, 4
TEXT = "y" * 40_000
READER_SCRIPT = Path(__file__).with_name("burst_readers.py")


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def store(
    request: pytest.FixtureRequest, anyio_backend: str, tmp_path: Path
) -> AsyncIterator[HistoryStore]:
    kind: str = request.param
    if kind == "memory":
        yield MemoryStore()
    elif kind == "sqlite":
        from chatcore_store.sqlite import SQLiteStore

        yield SQLiteStore(tmp_path / "chat.db")
    else:
        if anyio_backend != "asyncio":
            pytest.skip("psycopg's async connections run on asyncio")
        _need_postgres()
        from chatcore_store.postgres import PostgresStore

        schema = f"test_burst_{os.getpid()}_{secrets.token_hex(4)}"
        try:
            yield PostgresStore(PG_URL, schema=schema)
        finally:
            await _drop_schema(schema)


PG_URL = os.environ.get("CHATCORE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def _need_postgres() -> None:
    """Skip (fail under CI) when PostgreSQL does not answer, as tests/store does."""
    try:
        import psycopg
    except ImportError:  # pragma: no cover - the postgres extra is not installed
        pytest.skip("psycopg is not installed (pip install 'chatcore[postgres]')")
    try:
        with psycopg.connect(PG_URL, connect_timeout=3) as db:
            db.execute("SELECT 1")
    except psycopg.Error as exc:
        why = f"PostgreSQL at {PG_URL} is unreachable: {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)


async def _drop_schema(schema: str) -> None:
    import psycopg
    from psycopg import sql

    async with await psycopg.AsyncConnection.connect(PG_URL, autocommit=True) as db:
        await db.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


async def _sender(url: str, name: str, go: anyio.Event, result: dict[str, Any]) -> None:
    """Join, wait for ``go``, send a burst, read the others' messages and the acks."""
    others = (SENDERS - 1) * BURST
    offsets: list[int] = []
    acks = 0
    async with ws_connect(f"{url}?user={name}&room=burst", max_queue=None, **JSON) as ws:
        await welcome(ws)
        result["ready"] = True
        await go.wait()
        for i in range(BURST):
            await ws.send(
                json.dumps({"type": "send", "room": "burst", "text": TEXT, "id": f"{name}-{i}"})
            )
        try:
            while len(offsets) < others or acks < BURST:
                event = await recv(ws)
                if event["type"] == "message":
                    offsets.append(event["offset"])
                elif event["type"] == "ack":
                    acks += 1
                elif event["type"] == "error":
                    result["errors"] = [*result.get("errors", []), event]
        except Exception as exc:  # closed: recorded, asserted on below
            result["closed"] = getattr(getattr(exc, "rcvd", None), "code", repr(exc))
    result["offsets"], result["acks"] = offsets, acks


async def test_a_burst_of_big_messages_closes_no_reader_that_keeps_up(
    store: HistoryStore,
) -> None:
    async with serving(config=Config(), store=store) as srv:
        readers = await anyio.open_process(
            [sys.executable, str(READER_SCRIPT), srv.ws, "burst", str(READERS), "50"],
        )
        async with readers:
            assert readers.stdout is not None
            lines = TextReceiveStream(readers.stdout)
            out = ""
            with anyio.fail_after(GUARD):
                while "ready\n" not in out:
                    out += await lines.receive()
            out = out.split("ready\n", 1)[1]
            go = anyio.Event()
            results: dict[str, dict[str, Any]] = {f"sender{i}": {} for i in range(SENDERS)}
            with anyio.fail_after(GUARD * 3):
                async with anyio.create_task_group() as tg:
                    for name, result in results.items():
                        tg.start_soon(_sender, srv.ws, name, go, result)
                    while not all(r.get("ready") for r in results.values()):
                        await anyio.sleep(0.01)
                    go.set()
                while "\n" not in out:
                    out += await lines.receive()
            await readers.wait()
        got = json.loads(out)
        every = list(range(1, SENDERS * BURST + 1))
        for i, reader in enumerate(got):
            assert (reader["code"], reader["offsets"]) == (None, every), f"reader{i}"
        for name, result in results.items():
            assert "closed" not in result, (name, result["closed"])
            assert "errors" not in result, (name, result["errors"])
            assert result["acks"] == BURST, name
            assert result["offsets"] == sorted(result["offsets"]), name
            assert len(result["offsets"]) == (SENDERS - 1) * BURST, name
