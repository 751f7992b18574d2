"""ChatApp mounted in Starlette and FastAPI: /chat/ws, /chat/, lifespan and identity."""

from __future__ import annotations

import importlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from websockets.exceptions import InvalidStatus

from chatcore_asgi import ChatApp
from conformance.wire import is_type, recv, recv_until, ws_open

from .conftest import serve

pytestmark = pytest.mark.anyio


async def _get(url: str) -> tuple[int, bytes]:
    async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
        reply = await client.get(url)
        return reply.status_code, reply.content


def _starlette(chat: ChatApp) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with chat.running():
            yield

    async def home(request: Any) -> PlainTextResponse:
        return PlainTextResponse("the host app")

    return Starlette(routes=[Route("/", home), Mount("/chat", chat)], lifespan=lifespan)


def _header_user(scope: Any) -> str | None:
    """The host app's notion of the user: here a header its proxy sets."""
    return dict(scope["headers"]).get(b"x-user", b"").decode() or None


@pytest.mark.parametrize("kind", ["uvicorn", "hypercorn"])
async def test_mounted_in_starlette_the_host_app_names_the_user(kind: str) -> None:
    chat = ChatApp(identify=_header_user)
    async with serve(kind, _starlette(chat)) as url:
        assert await _get(f"{url}/") == (200, b"the host app")
        status, page = await _get(f"{url}/chat/")
        assert status == 200
        assert b"static/app.js" in page
        assert (await _get(f"{url}/chat/static/app.js"))[0] == 200
        assert json.loads((await _get(f"{url}/chat/healthz"))[1])["status"] == "ok"
        ws = url.replace("http", "ws", 1) + "/chat/ws"
        # The user parameter is not trusted: the host app's hook names the user.
        async with ws_open(
            f"{ws}?user=mallory&room=r", additional_headers={"x-user": "alice"}
        ) as a:
            hello = await recv(a)
            assert (hello["type"], hello["user"]) == ("welcome", "alice")
            await recv_until(a, is_type("members"))
        # No user from the hook: refused before the upgrade, 401.
        with pytest.raises(InvalidStatus) as refused:
            async with ws_open(f"{ws}?user=alice&room=r"):
                pass
        assert refused.value.response.status_code == 401


async def test_standalone_serves_the_page_at_the_root() -> None:
    chat = ChatApp()
    async with serve("uvicorn", chat) as url:
        assert (await _get(f"{url}/"))[0] == 200
        ws = url.replace("http", "ws", 1) + "/ws"
        async with ws_open(f"{ws}?user=bob&room=r") as b:
            assert (await recv(b))["user"] == "bob"


async def test_the_fastapi_example_mounts_chat_at_slash_chat() -> None:
    example = importlib.import_module("examples.fastapi_app")
    async with serve("uvicorn", example.app) as url:
        async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
            reply = await client.get(f"{url}/login?name=carol")
            cookie = reply.headers["set-cookie"].split(";")[0]
        ws = url.replace("http", "ws", 1) + "/chat/ws"
        async with ws_open(f"{ws}?room=r", additional_headers={"cookie": cookie}) as c:
            assert (await recv(c))["user"] == "carol"


async def test_history_over_http_asks_the_identity_hook() -> None:
    """With a hook, ``?user=`` is not trusted: a private room answers its reader only."""
    chat = ChatApp(identify=_header_user)
    async with serve("uvicorn", _starlette(chat)) as url:
        chat.create_room("staff", private=True, allow=["alice"])
        page = f"{url}/chat/rooms/staff/messages"
        async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
            assert (await client.get(f"{page}?user=alice")).status_code == 401
            named = await client.get(f"{page}?user=alice", headers={"x-user": "bob"})
            assert named.status_code == 403
            allowed = await client.get(page, headers={"x-user": "alice"})
            assert allowed.status_code == 200
