"""ChatApp's ``/metrics`` under uvicorn: refusals before ``websocket.accept`` are counted.

Scraped over a real socket and parsed with prometheus-client's own parser.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import InvalidStatus

from chatcore_asgi import ChatApp
from conformance.wire import recv, ws_open

from .conftest import serve

pytestmark = pytest.mark.anyio


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
