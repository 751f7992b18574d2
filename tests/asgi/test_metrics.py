"""ChatApp's ``/metrics``: ``chatcore_written_bytes_total`` counts all text handed to ``send``, and
refusals before ``websocket.accept`` are counted by reason (parsed with prometheus-client's parser).
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import InvalidStatus

from chatcore import Config
from chatcore_asgi import ChatApp
from conformance.wire import GUARD, is_type, recv, recv_until, send, welcome, ws_open

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


def _header_user(scope: Any) -> str | None:
    return dict(scope["headers"]).get(b"x-user", b"").decode() or None


async def _refusals(url: str) -> dict[str, float]:
    async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
        reply = await client.get(f"{url}/metrics")
    assert reply.status_code == 200, reply.text
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            if sample.name == "chatcore_refusals_total":
                found[sample.labels["reason"]] = sample.value
    return found


async def _refused(url: str, status: int, headers: dict[str, str] | None = None) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with ws_open(url, additional_headers=headers):
            pass
    assert refused.value.response.status_code == status


async def test_refusals_before_accept_are_counted_by_reason() -> None:
    chat = ChatApp(identify=_header_user, max_connections=1)
    async with serve("uvicorn", chat) as url:
        ws = url.replace("http", "ws", 1) + "/ws"
        before = await _refusals(url)
        assert before["server_full"] == before["unauthorized"] == 0
        await _refused(f"{ws}?room=r", 403, {"origin": "http://evil.example", "x-user": "alice"})
        await _refused(f"{ws}?room=r", 401)  # identify names nobody
        await _refused(f"{ws}?room=bad%20name", 400, {"x-user": "alice"})
        async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
            assert (await client.get(f"{url}/ws")).status_code == 426
        async with ws_open(f"{ws}?room=r", additional_headers={"x-user": "alice"}) as alice:
            assert (await recv(alice))["type"] == "welcome"
            await _refused(f"{ws}?room=r", 503, {"x-user": "bob"})
        after = await _refusals(url)
    assert after["origin_not_allowed"] == 1
    assert after["unauthorized"] == 1
    assert after["bad_query"] == 1
    assert after["bad_handshake"] == 1
    assert after["server_full"] == 1
    assert after["shutting_down"] == 0
