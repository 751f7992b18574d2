"""Authentication on (protocol.md sections 1 and 6): the token names the user, everywhere."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import pytest

from .conftest import Options, Server
from .wire import hs256, http_get, raw_http, unique, upgrade_request, welcome, ws_open

pytestmark = pytest.mark.anyio

SECRET = "conformance-secret"
SERVER_OPTIONS = Options(jwt_secret=SECRET, private_rooms={"board": ("alice",)})


def token(sub: str | None, *, secret: str = SECRET, expires_in: float = 300) -> str:
    claims: dict[str, Any] = {"exp": int(time.time() + expires_in)}
    if sub is not None:
        claims["sub"] = sub
    return hs256(secret, claims)


BAD_TOKENS: dict[str, Callable[[], str]] = {
    "wrong-signature": lambda: token("alice", secret="another secret"),
    "expired": lambda: token("alice", expires_in=-3600),
    "no-sub": lambda: token(None),
    "garbage": lambda: "not.a.token",
}


@pytest.mark.parametrize("bad", [None, *BAD_TOKENS], ids=["none", *BAD_TOKENS])
async def test_a_websocket_without_a_valid_token_is_refused_401(
    server: Server, bad: str | None
) -> None:
    query = "user=alice&room=general"
    if bad is not None:
        query += f"&token={BAD_TOKENS[bad]()}"
    status, _, body = await raw_http(server.port, upgrade_request(server.port, f"/ws?{query}"))
    assert status == 401
    assert body["error"]["status"] == 401


async def test_the_tokens_sub_wins_over_the_user_parameter(server: Server) -> None:
    bob = unique("bob")
    async with ws_open(server.ws(f"user=alice&token={token(bob)}")) as conn:
        assert (await welcome(conn))["user"] == bob


async def test_a_bearer_header_authenticates_a_websocket(server: Server) -> None:
    bob = unique("bob")
    headers = {"Authorization": f"Bearer {token(bob)}"}
    async with ws_open(server.ws(), additional_headers=headers) as conn:
        assert (await welcome(conn))["user"] == bob


def messages_url(server: Server, room: str, query: str = "") -> str:
    return f"{server.url}rooms/{quote(room, safe='')}/messages" + (f"?{query}" if query else "")


@pytest.mark.parametrize("bad", [None, *BAD_TOKENS], ids=["none", *BAD_TOKENS])
async def test_history_without_a_valid_token_is_401_even_public(
    server: Server, bad: str | None
) -> None:
    query = "" if bad is None else f"token={BAD_TOKENS[bad]()}"
    status, headers, body = await http_get(messages_url(server, "general", query))
    assert status == 401
    assert headers["www-authenticate"].startswith("Bearer")
    assert body["error"]["status"] == 401


async def test_history_with_a_token_in_the_query_or_a_header(server: Server) -> None:
    room = unique("room")
    status, _, page = await http_get(messages_url(server, room, f"token={token('zed')}"))
    assert (status, page["messages"]) == (200, [])
    headers = {"Authorization": f"Bearer {token('zed')}"}
    status, _, page = await http_get(messages_url(server, room), headers)
    assert (status, page["messages"]) == (200, [])


async def test_history_of_a_private_room_follows_the_tokens_user(server: Server) -> None:
    status, _, _ = await http_get(messages_url(server, "board", f"token={token('mallory')}"))
    assert status == 403
    # The token names the reader: a user parameter does not.
    query = f"user=alice&token={token('mallory')}"
    status, _, _ = await http_get(messages_url(server, "board", query))
    assert status == 403
    status, _, page = await http_get(messages_url(server, "board", f"token={token('alice')}"))
    assert (status, page["type"]) == (200, "history")
