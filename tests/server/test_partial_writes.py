"""A write the socket takes only in part: the rest must follow, in order.

The server writes each peer's queue straight to its socket when nothing waits
before it; a reader with a small receive buffer makes those writes short. Every
byte not taken must still reach the reader, after what was taken and before
anything queued later: each message arrives whole, once, in order.
"""

from __future__ import annotations

import json

import anyio
import pytest

from chatcore import Config

from .conftest import (
    GUARD,
    JSON,
    recv,
    recv_until,
    serving,
    welcome,
    ws_connect,
    ws_connect_small_buffer,
)

pytestmark = pytest.mark.anyio

UNLIMITED = {
    "rate_burst": 10**6,
    "rate_per_second": 1e6,
    "request_burst": 10**6,
    "request_per_second": 1e6,
}


async def test_a_reader_behind_a_small_buffer_gets_every_message_whole_and_in_order() -> None:
    total, window = 120, 8  # 8 x 32 KB in flight: far more than the reader's socket holds
    async with (
        serving(config=Config(**UNLIMITED)) as srv,
        ws_connect(f"{srv.ws}?user=alice&room=general", max_queue=None, **JSON) as alice,
        ws_connect_small_buffer(
            f"{srv.ws}?user=bob&room=general", 4096, max_queue=None, **JSON
        ) as bob,
    ):
        await welcome(alice)
        await welcome(bob)
        await recv_until(alice, lambda e: e.get("user") == "bob")
        texts: list[str] = []
        progress = anyio.Event()

        async def bob_reads() -> None:
            nonlocal progress
            while len(texts) < total:
                event = await recv(bob)
                if event["type"] == "message":
                    texts.append(event["text"])
                    progress.set()

        with anyio.fail_after(GUARD * 3):
            async with anyio.create_task_group() as tg:
                tg.start_soon(bob_reads)
                for sent in range(total):
                    while sent - len(texts) >= window:
                        progress = anyio.Event()
                        await progress.wait()
                    text = f"{sent:04d}:" + chr(ord("a") + sent % 26) * 32_000
                    await alice.send(json.dumps({"type": "send", "room": "general", "text": text}))
        assert texts == [f"{i:04d}:" + chr(ord("a") + i % 26) * 32_000 for i in range(total)]
