"""Fixtures for the store suites: every store behind one face, and PostgreSQL.

``make_store`` opens a store of the kind under test; calling it again opens a
new store object on the same storage (a restart of the server). PostgreSQL
runs use a schema of their own, dropped afterwards, so parallel and repeated
runs never see each other's rooms.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from chatcore_store import HistoryStore, MemoryStore

PG_URL = os.environ.get("CHATCORE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")

MakeStore = Callable[[], Awaitable[HistoryStore]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # psycopg's async connections run on asyncio


def _pg_reachable() -> str | None:
    """None if PostgreSQL answers, else why not."""
    try:
        import psycopg
    except ImportError:  # pragma: no cover - the postgres extra is not installed
        return "psycopg is not installed (pip install 'chatcore[postgres]')"
    try:
        with psycopg.connect(PG_URL, connect_timeout=3) as db:
            db.execute("SELECT 1")
    except psycopg.Error as exc:
        return f"PostgreSQL at {PG_URL} is unreachable: {exc}"
    return None


@pytest.fixture(scope="session")
def pg_url() -> str:
    why = _pg_reachable()
    if why is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    return PG_URL


def new_schema() -> str:
    return f"test_store_{os.getpid()}_{secrets.token_hex(4)}"


async def drop_schema(schema: str) -> None:
    import psycopg
    from psycopg import sql

    async with await psycopg.AsyncConnection.connect(PG_URL, autocommit=True) as db:
        await db.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MakeStore]:
    """Open a store of each kind; each call is a restart on the same storage."""
    kind: str = request.param
    opened: list[HistoryStore] = []
    schema = new_schema()
    memory = MemoryStore()
    if kind == "postgres":
        request.getfixturevalue("pg_url")

    async def make() -> HistoryStore:
        store: HistoryStore
        if kind == "memory":
            store = memory
        elif kind == "sqlite":
            from chatcore_store.sqlite import SQLiteStore

            store = SQLiteStore(tmp_path / "chat.db")
        else:
            from chatcore_store.postgres import PostgresStore

            store = PostgresStore(PG_URL, schema=schema)
        await store.open()
        opened.append(store)
        return store

    try:
        yield make
    finally:
        for store in opened:
            await store.close()
        if kind == "postgres":
            await drop_schema(schema)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "pg_outage: stops and restarts the local PostgreSQL server"
        " (deselect with -m 'not pg_outage')",
    )
