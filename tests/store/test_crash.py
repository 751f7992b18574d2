"""The crash test: a real ``chatcore serve`` on SQLite, killed with SIGKILL mid-stream.

Clients send with client ids; the server is killed while sends are in
flight, then started again on the same file. Each client resends everything
it sent, with the same ids, as a client that cannot tell what was stored
must. Afterwards every message any client saw acked is stored exactly once,
with the offset it was acked with; offsets run 1..N without a gap or a
repeat; the room's epoch is unchanged; and a user who watches the room after
the restart receives each new message once and no retried one again.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import Process
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from chatcore_store.sqlite import SQLiteStore

from .outage import unwritable

pytest.importorskip("chatcore_server", reason="the server adapter is absent")

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = 8
EACH = 10  # within the server's default burst of 10 sends, so none is rate limited
WINDOW = 3  # sends in flight per client
KILL_AFTER = 20  # acks seen before the kill
URL_LINE = re.compile(rb"chatcore is running: open http://127\.0\.0\.1:(\d+)/")


async def start_server(db: Path) -> tuple[Process, int]:
    log = (db.parent / "server.log").open("ab")  # read it when the test fails
    process = await anyio.open_process(
        [
            sys.executable,
            "-m",
            "chatcore_server",
            "serve",
            "--port",
            "0",
            "--db",
            f"sqlite:///{db}",
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        stderr=log,
    )
    log.close()
    assert process.stdout is not None
    seen = b""
    with anyio.fail_after(30):
        while (match := URL_LINE.search(seen)) is None:
            seen += await process.stdout.receive()
    return process, int(match.group(1))


async def stop(process: Process, signum: signal.Signals) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signum)
    with anyio.fail_after(30):
        await process.wait()


def url(port: int, user: str) -> str:
    return f"ws://127.0.0.1:{port}/ws?user={user}&room=lobby"


class Crash:
    """Kills the server the moment ``after`` acks have arrived, and stops every
    client from sending more: messages are in flight, others not yet sent."""

    def __init__(self, process: Process, after: int) -> None:
        self.process = process
        self.after = after
        self.done = False

    def check(self, acked: int) -> None:
        if not self.done and acked >= self.after:
            self.done = True
            self.process.send_signal(signal.SIGKILL)


async def sender(
    port: int, user: str, acks: dict[str, int], epochs: list[str], crash: Crash | None
) -> None:
    """Send EACH messages with ids ``user-i``, WINDOW of them in flight; record the acks.

    Returns when all are acked, or (with ``crash``) when the server is gone.
    """
    sent = 0
    try:
        async with connect(url(port, user), subprotocols=["chatcore.v1"]) as ws:
            welcome = json.loads(await ws.recv())
            assert welcome["type"] == "welcome"
            epochs.append(welcome["rooms"]["lobby"]["epoch"])
            while len(acks_of(acks, user)) < EACH:
                while sent < EACH and sent - len(acks_of(acks, user)) < WINDOW:
                    if crash is not None and crash.done:
                        break
                    frame = {"type": "send", "room": "lobby", "text": f"{user} {sent}"}
                    await ws.send(json.dumps({**frame, "id": f"{user}-{sent}"}))
                    sent += 1
                event: dict[str, Any] = json.loads(await ws.recv())
                if event["type"] == "ack":
                    acks[event["id"]] = event["offset"]
                    if crash is not None:
                        crash.check(len(acks))
                elif event["type"] == "error":
                    raise AssertionError(f"{user} got an error: {event}")
    except ConnectionClosed:
        if crash is None:
            raise


def acks_of(acks: dict[str, int], user: str) -> list[str]:
    return [k for k in acks if k.startswith(f"{user}-")]


async def test_acked_messages_survive_kill_9_exactly_once(tmp_path: Path) -> None:
    db = tmp_path / "chat.db"
    users = [f"user{n}" for n in range(CLIENTS)]
    before: dict[str, int] = {}
    epochs: list[str] = []

    process, port = await start_server(db)
    try:
        with anyio.fail_after(60):
            crash = Crash(process, after=KILL_AFTER)
            async with anyio.create_task_group() as tg:
                for user in users:
                    tg.start_soon(sender, port, user, before, epochs, crash)
    finally:
        await stop(process, signal.SIGKILL)
    assert crash.done
    assert len(before) <= KILL_AFTER + CLIENTS * WINDOW < CLIENTS * EACH  # killed mid-stream

    after: dict[str, int] = {}
    process, port = await start_server(db)
    try:
        with anyio.fail_after(60):
            async with connect(url(port, "watcher"), subprotocols=["chatcore.v1"]) as watcher:
                welcome = json.loads(await watcher.recv())
                head = welcome["rooms"]["lobby"]["offset"]
                epochs.append(welcome["rooms"]["lobby"]["epoch"])
                async with anyio.create_task_group() as tg:
                    for user in users:
                        tg.start_soon(sender, port, user, after, epochs, None)
                seen: list[int] = []
                while len(seen) < CLIENTS * EACH - head:
                    event = json.loads(await watcher.recv())
                    if event["type"] == "message":
                        seen.append(event["offset"])
    finally:
        await stop(process, signal.SIGTERM)

    assert len(set(epochs)) == 1  # one epoch before and after the crash
    # Every send acked before the crash keeps its offset when retried.
    assert {k: after[k] for k in before} == before
    # The watcher got each message stored after the restart once, none stored before it.
    assert sorted(seen) == list(range(head + 1, CLIENTS * EACH + 1))

    async with SQLiteStore(db) as store:
        stored = await store.history("lobby")
    assert [m.offset for m in stored] == list(range(1, CLIENTS * EACH + 1))
    ids = [m.client_id for m in stored]
    assert sorted(ids, key=str) == sorted(f"{u}-{i}" for u in users for i in range(EACH))
    assert {m.client_id: m.offset for m in stored} == after


async def next_of(ws: Any, *kinds: str) -> dict[str, Any]:
    """The next event of one of ``kinds``; every other event is skipped."""
    while True:
        event: dict[str, Any] = json.loads(await ws.recv())
        if event["type"] in kinds:
            return event


async def test_server_refuses_sends_while_the_file_is_unwritable_then_recovers(
    tmp_path: Path,
) -> None:
    db = tmp_path / "chat.db"
    process, port = await start_server(db)
    try:
        with anyio.fail_after(60):
            async with (
                connect(url(port, "alice"), subprotocols=["chatcore.v1"]) as alice,
                connect(url(port, "bob"), subprotocols=["chatcore.v1"]) as bob,
            ):
                await next_of(alice, "welcome")
                await next_of(bob, "welcome")
                send = {"type": "send", "room": "lobby"}
                await alice.send(json.dumps({**send, "text": "before", "id": "a1"}))
                assert (await next_of(alice, "ack"))["offset"] == 1
                assert (await next_of(bob, "message"))["text"] == "before"

                with unwritable(db):
                    await alice.send(json.dumps({**send, "text": "during", "id": "a2"}))
                    error = await next_of(alice, "error", "ack")
                    assert (error["type"], error["code"]) == ("error", "unavailable")
                    # Bob's history reply comes after anything broadcast before it:
                    # the refused message was never sent to him.
                    await bob.send(json.dumps({"type": "history", "room": "lobby"}))
                    page = await next_of(bob, "history", "message")
                    assert page["type"] == "history"
                    assert [m["text"] for m in page["messages"]] == ["before"]
                    await bob.send(json.dumps({"type": "join", "room": "elsewhere"}))
                    refused = await next_of(bob, "error", "members")
                    assert (refused["type"], refused["code"]) == ("error", "unavailable")

                # Back by itself: the client's retry is stored, without a gap.
                await alice.send(json.dumps({**send, "text": "during", "id": "a2"}))
                ack = await next_of(alice, "ack", "error")
                assert (ack["type"], ack["offset"], ack["id"]) == ("ack", 2, "a2")
                message = await next_of(bob, "message")
                assert (message["offset"], message["text"]) == (2, "during")
                await bob.send(json.dumps({"type": "join", "room": "elsewhere"}))
                assert (await next_of(bob, "members", "error"))["type"] == "members"
    finally:
        await stop(process, signal.SIGTERM)
