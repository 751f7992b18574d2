"""EngineHost with an in-memory transport of ours: no socket, no HTTP, no WebSocket.

The transport records what the host asks of it, as a server would carry it
out; the stores are the real ones (MemoryStore inline, SQLite through the
worker). Real time only where the engine's timer is what is tested, with a
grace period of a fraction of a second.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from chatcore import (
    Config,
    Disconnected,
    Engine,
    Mode,
    Receive,
    SeededIds,
    parse_connect,
)
from chatcore_host import EngineHost, Transport
from chatcore_store import HistoryStore, MemoryStore
from chatcore_store.sqlite import SQLiteStore

from .conftest import GUARD

pytestmark = pytest.mark.anyio


class Wire:
    """A Transport that keeps every frame per connection, decoded."""

    def __init__(self) -> None:
        self.frames: defaultdict[int, list[dict[str, Any]]] = defaultdict(list)
        self.closed: dict[int, tuple[int, str]] = {}
        self.pings: list[int] = []
        self.turns = 0
        self.changed = anyio.Event()

    def deliver(self, to: tuple[int, ...], text: str) -> None:
        for conn in to:
            self.frames[conn].append(json.loads(text))
        self._wake()

    def close(self, conn: int, code: int, reason: str) -> None:
        self.closed[conn] = (code, reason)
        self._wake()

    def ping(self, conn: int) -> None:
        self.pings.append(conn)
        self._wake()

    def end_turn(self, *, nested: bool) -> None:
        if not nested:
            self.turns += 1

    def _wake(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()

    def of(self, conn: int, kind: str) -> list[dict[str, Any]]:
        return [f for f in self.frames[conn] if f["type"] == kind]

    async def until(self, done: Callable[[], bool]) -> None:
        """Wait until ``done()`` holds (each time the host sends something), within GUARD."""
        with anyio.fail_after(GUARD):
            while not done():
                await self.changed.wait()


@asynccontextmanager
async def hosted(
    store: HistoryStore, config: Config | None = None
) -> AsyncIterator[tuple[EngineHost, Wire]]:
    wire = Wire()
    checked: Transport = wire
    host = EngineHost(checked, config=config, store=store, ids=SeededIds(7))
    async with host.running():
        yield host, wire


def connect(host: EngineHost, conn: int, user: str, room: str = "lobby") -> None:
    host.feed(parse_connect(conn, f"user={user}&room={room}", Mode.JSON))


def send(host: EngineHost, conn: int, text: str, room: str = "lobby") -> None:
    host.feed(Receive(conn=conn, text=json.dumps({"type": "send", "room": room, "text": text})))


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> HistoryStore:
    if request.param == "memory":
        return MemoryStore()
    return SQLiteStore(tmp_path / "chat.db")


async def test_connect_and_send_go_through_the_log_and_come_back_numbered(
    store: HistoryStore,
) -> None:
    async with hosted(store) as (host, wire):
        connect(host, 1, "alice")
        connect(host, 2, "bob")
        await wire.until(lambda: bool(wire.of(1, "welcome") and wire.of(2, "members")))
        send(host, 1, "one")
        send(host, 1, "two")
        # The message reaches bob only once the store has numbered it (its answer fed back).
        await wire.until(lambda: len(wire.of(2, "message")) == 2)
        messages = wire.of(2, "message")
        assert [(m["text"], m["from"]) for m in messages] == [("one", "alice"), ("two", "alice")]
        assert messages[1]["offset"] == messages[0]["offset"] + 1
        assert [a["offset"] for a in wire.of(1, "ack")] == [m["offset"] for m in messages]
        # The host reads the same log for HTTP, outside the engine.
        stored = await host.history("lobby", before=2**62, limit=10)
        assert [m.text for m in stored] == ["one", "two"]
    assert wire.turns > 0


async def test_the_timer_ends_a_grace_period_that_runs_out(store: HistoryStore) -> None:
    config = Config(grace_period=0.2)
    async with hosted(store, config) as (host, wire):
        connect(host, 1, "alice")
        connect(host, 2, "bob")
        await wire.until(lambda: bool(wire.of(1, "joined")))
        host.feed(Disconnected(conn=2))  # no close frame: bob may resume for 0.2 s
        assert wire.of(1, "left") == []
        # No command comes: only the host's timer, armed from next_deadline(), can do it.
        await wire.until(lambda: bool(wire.of(1, "left")))
        assert wire.of(1, "left")[0]["user"] == "bob"


async def test_a_timer_armed_inside_a_turn_is_armed_when_the_turn_ends() -> None:
    # A server feeds the frames of one read inside a turn; the host re-arms once, as
    # the turn ends. Nothing is fed after it here (no flush reports come back).
    quiet = Config(grace_period=0.2, ping_interval=1e6, presence_interval=1e6)
    async with hosted(MemoryStore(), quiet) as (host, wire):
        connect(host, 1, "alice")
        connect(host, 2, "bob")
        await wire.until(lambda: bool(wire.of(1, "joined")))
        with anyio.fail_after(GUARD):
            while host._timer is None:  # (its task starts at this test's first checkpoint)
                await anyio.lowlevel.checkpoint()
        with host.turn():
            host.feed(Disconnected(conn=2))
        # No other timer is due: only the grace period's deadline ends this in time.
        await wire.until(lambda: bool(wire.of(1, "left")))


async def test_the_timer_pings_through_the_transport() -> None:
    async with hosted(MemoryStore(), Config(ping_interval=0.05)) as (host, wire):
        connect(host, 1, "alice")
        await wire.until(lambda: 1 in wire.pings)


async def test_an_engine_failure_on_the_timer_is_logged_and_the_host_goes_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    tick = Engine.tick
    planted = [True]

    def broken_once(self: Engine, now: float) -> Any:
        if planted:
            planted.clear()
            raise RuntimeError("planted engine bug")
        return tick(self, now)

    monkeypatch.setattr("chatcore_host._host._AFTER_TIMER_FAILURE", 0.05)
    monkeypatch.setattr(Engine, "tick", broken_once)
    async with hosted(MemoryStore(), Config(grace_period=0.1)) as (host, wire):
        connect(host, 1, "alice")
        connect(host, 2, "bob")
        await wire.until(lambda: bool(wire.of(1, "joined")))
        host.feed(Disconnected(conn=2))
        await wire.until(lambda: bool(wire.of(1, "left")))  # the next tick did it
        send(host, 1, "still here")
        await wire.until(lambda: bool(wire.of(1, "ack")))
    critical = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert critical, "the engine failure was not logged loudly"
    logged = critical[0].exc_info
    assert logged is not None
    assert "planted engine bug" in str(logged[1])


async def test_leaving_running_hands_the_store_what_is_pending(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "chat.db")
    async with hosted(store) as (host, wire):
        connect(host, 1, "alice")
        await wire.until(lambda: bool(wire.of(1, "members")))
        send(host, 1, "last words")  # still in the worker's batch when the block ends
    reopened = SQLiteStore(tmp_path / "chat.db")
    await reopened.open()
    try:
        assert [m.text for m in await reopened.history("lobby")] == ["last words"]
    finally:
        await reopened.close()


def test_a_store_that_answers_at_once_runs_inline() -> None:
    wire = Wire()
    host = EngineHost(wire, store=MemoryStore(), ids=SeededIds(1))
    # No running() and no await: every answer was fed back within the call.
    connect(host, 1, "alice")
    send(host, 1, "hi")
    assert [a["offset"] for a in wire.of(1, "ack")] == [1]
