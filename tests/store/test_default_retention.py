"""The server-wide retention default, applied by a running ChatServer to SQLite and PostgreSQL.

``Limits(retain_messages=N)`` (``chatcore serve --retain-messages N``) cuts
every stored room that has no count limit of its own down to its newest N
messages; a room's own limit wins. PostgreSQL runs in a schema of its own.
"""

from __future__ import annotations

import json

import anyio
import pytest
import websockets.asyncio.client

from chatcore import Config
from chatcore_server import ChatServer, Limits
from chatcore_store import DurableStore

from .conftest import MakeStore

pytestmark = pytest.mark.anyio

GUARD = 10


async def _stored(store: DurableStore, room: str) -> list[int]:
    return [m.offset for m in await store.history(room)]


async def test_a_running_server_cuts_rooms_to_the_default_but_not_below_their_own(
    make_store: MakeStore,
) -> None:
    store = await make_store()
    assert isinstance(store, DurableStore)
    limits = Limits(retain_messages=3, retention_interval=0.05)
    config = Config(rate_burst=50)  # 16 messages at once
    server = ChatServer(store=store, port=0, limits=limits, config=config)
    async with anyio.create_task_group() as tasks:
        url = await tasks.start(server.serve)
        ws = url.replace("http", "ws", 1) + "ws"
        await store.save_room("kept", private=False, allow=frozenset())
        await store.set_retention("kept", max_messages=6)
        async with websockets.asyncio.client.connect(
            f"{ws}?user=alice&room=lobby&room=kept", subprotocols=["chatcore.v1"], proxy=None
        ) as alice:
            for room in ("lobby", "kept"):
                for i in range(8):
                    await alice.send(json.dumps({"type": "send", "room": room, "text": f"m{i}"}))
            acks = 0
            with anyio.fail_after(GUARD):
                while acks < 16:
                    acks += json.loads(await alice.recv())["type"] == "ack"
            with anyio.fail_after(GUARD):
                while await _stored(store, "lobby") != [6, 7, 8]:
                    await anyio.sleep(0.02)
                while await _stored(store, "kept") != [3, 4, 5, 6, 7, 8]:
                    await anyio.sleep(0.02)
        server.shutdown()
