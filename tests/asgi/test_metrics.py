"""ChatApp's ``/metrics``: ``chatcore_written_bytes_total`` counts all text handed to ``send``."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from chatcore import Config
from chatcore_asgi import ChatApp
from conformance.wire import GUARD, is_type, recv_until, send, welcome, ws_open

from .conftest import serve

pytestmark = pytest.mark.anyio


async def _written_bytes(url: str) -> int:
    async with httpx.AsyncClient(trust_env=False, timeout=GUARD) as client:
        page = (await client.get(f"{url}/metrics")).text
    found = re.search(r"^chatcore_written_bytes_total (\S+)$", page, re.MULTILINE)
    assert found is not None, page
    return int(float(found.group(1)))


class Counted:
    """A client connection that counts the UTF-8 bytes of every frame it receives."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.nbytes = 0
        conn_recv = conn.recv

        async def recv(*args: Any, **kwargs: Any) -> Any:
            data = await conn_recv(*args, **kwargs)
            self.nbytes += len(data.encode() if isinstance(data, str) else data)
            return data

        conn.recv = recv

    async def settle(self, room: str) -> None:
        """Read up to the answer of a request: every frame sent before it has arrived."""
        await send(self.conn, type="history", room=room, limit=1)
        await recv_until(self.conn, is_type("history"))


@pytest.mark.parametrize("kind", ["uvicorn", "hypercorn"])
async def test_written_bytes_are_every_frame_the_clients_received(kind: str) -> None:
    chat = ChatApp(config=Config(rate_burst=1000, rate_per_second=1000.0))
    async with serve(kind, chat) as url:
        ws = url.replace("http", "ws", 1) + "/ws"
        async with ws_open(f"{ws}?user=a&room=r") as a, ws_open(f"{ws}?user=b&room=r") as b:
            ca, cb = Counted(a), Counted(b)
            await welcome(a)
            await welcome(b)
            for n in range(50):  # a reader that keeps up: the writer's queue drains each time
                await send(a, type="send", room="r", text=f"héllo € {n}", id=f"m{n}")
                await recv_until(a, is_type("ack"))
                await recv_until(b, is_type("message"))
            await ca.settle("r")
            await cb.settle("r")
            received = ca.nbytes + cb.nbytes
            assert received > 50 * len("héllo € 0".encode())
            assert await _written_bytes(url) == received
