"""A client that stops reading is closed with 1013; everyone else keeps receiving."""

from __future__ import annotations

import json

import anyio
import pytest

from chatcore import Config
from chatcore_server import Limits

from .conftest import (
    GUARD,
    JSON,
    close_code,
    recv,
    recv_until,
    serving,
    welcome,
    ws_connect,
    ws_connect_small_buffer,
)

pytestmark = pytest.mark.anyio

TEXT = "x" * 32_000


async def test_slow_reader_is_closed_1013_and_others_get_everything() -> None:
    config = Config(
        rate_burst=1_000_000,
        rate_per_second=1_000_000.0,
        request_burst=1_000_000,
        request_per_second=1_000_000.0,
    )
    async with (
        serving(config=config, limits=Limits(close_timeout=GUARD)) as srv,
        ws_connect(f"{srv.ws}?user=alice&room=general", **JSON) as alice,
        ws_connect(f"{srv.ws}?user=bob&room=general", **JSON) as bob,
        # A small receive buffer, so the kernel cannot absorb the whole flood.
        ws_connect_small_buffer(
            f"{srv.ws}?user=slow&room=general", 16384, max_queue=1, **JSON
        ) as slow,
    ):
        for conn in (alice, bob, slow):
            await welcome(conn)
        await recv_until(alice, lambda e: e.get("user") == "slow")
        await recv_until(bob, lambda e: e.get("user") == "slow")
        sent = 0
        received: list[int] = []

        async def bob_reads() -> None:
            while True:
                event = await recv(bob)
                if event["type"] == "message":
                    received.append(event["offset"])
                    if event["text"] == "done":
                        return

        async def alice_reads() -> None:
            while True:
                await recv(alice)

        with anyio.fail_after(GUARD * 3):
            async with anyio.create_task_group() as tg:
                tg.start_soon(alice_reads)
                bob_done = anyio.Event()

                async def bob_task() -> None:
                    await bob_reads()
                    bob_done.set()

                tg.start_soon(bob_task)
                # Flood until the server gives up on the slow reader (bounded).
                while srv.server.connections == 3 and sent < 3000:
                    for _ in range(20):
                        await alice.send(
                            json.dumps({"type": "send", "room": "general", "text": TEXT})
                        )
                        sent += 1
                    await anyio.sleep(0)  # let the server run between batches
                assert srv.server.connections == 2, "the slow reader was never closed"
                for _ in range(20):  # the room goes on at full speed
                    await alice.send(json.dumps({"type": "send", "room": "general", "text": TEXT}))
                    sent += 1
                await alice.send(json.dumps({"type": "send", "room": "general", "text": "done"}))
                sent += 1
                await bob_done.wait()
                tg.cancel_scope.cancel()
        assert received == list(range(1, sent + 1))
        # The slow reader, reading at last, finds what fitted and then the close.
        assert await close_code(slow) == 1013
