"""TLS with certificates from trustme, and HS256 tokens checked with PyJWT."""

from __future__ import annotations

import json
import ssl
import time

import jwt
import pytest
import trustme
from websockets.exceptions import InvalidStatus

from chatcore_server import ChatRejected, connect

from .conftest import JSON, http_get, recv, recv_until, serving, welcome, ws_connect

pytestmark = pytest.mark.anyio

SECRET = "test-secret-that-is-long-enough-for-hs256"


@pytest.fixture
def tls() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


def token(sub: str, secret: str = SECRET, **claims: object) -> str:
    return jwt.encode({"sub": sub, **claims}, secret, algorithm="HS256")


async def test_wss_and_https(tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_ctx, client_ctx = tls
    async with serving(ssl_context=server_ctx) as srv:
        assert srv.url.startswith("https://")
        async with (
            ws_connect(f"{srv.ws}?user=alice&room=general", ssl=client_ctx, **JSON) as alice,
            connect(srv.ws, user="bob", rooms=["general"], ssl_context=client_ctx) as bob,
        ):
            await welcome(alice)
            assert (await bob.receive())["type"] == "welcome"
            await bob.send("general", "over tls")
            got = await recv_until(alice, lambda e: e.get("text") == "over tls")
            assert got[-1]["from"] == "bob"
        status, _, body = await http_get(f"{srv.url}healthz", context=client_ctx)
        assert status == 200
        assert json.loads(body)["status"] == "ok"


async def test_jwt_names_the_user_and_bad_tokens_get_401() -> None:
    async with serving(jwt_secret=SECRET) as srv:
        # The token's sub wins over a user parameter.
        async with ws_connect(f"{srv.ws}?user=mallory&room=r&token={token('alice')}", **JSON) as a:
            assert (await recv(a))["user"] == "alice"
        headers = {"Authorization": f"Bearer {token('bob')}"}
        async with ws_connect(f"{srv.ws}?room=r", additional_headers=headers, **JSON) as b:
            assert (await recv(b))["user"] == "bob"
        bad = [
            "",
            f"&token={token('alice', secret='another-secret-of-enough-length-here')}",
            f"&token={token('alice', exp=int(time.time()) - 60)}",
            "&token=not.a.jwt",
        ]
        for extra in bad:
            with pytest.raises(InvalidStatus) as refused:
                async with ws_connect(f"{srv.ws}?user=alice&room=r{extra}"):
                    pass
            assert refused.value.response.status_code == 401


async def test_private_room_history_only_for_members_with_auth() -> None:
    async with serving(jwt_secret=SECRET) as srv:
        srv.server.create_room("secret", allow={"alice"})
        async with (
            ws_connect(f"{srv.ws}?room=secret&token={token('alice')}", **JSON) as a,
            ws_connect(f"{srv.ws}?room=general&token={token('bob')}", **JSON) as b,
        ):
            await welcome(b)
            await welcome(a)
            await a.send(json.dumps({"type": "send", "room": "secret", "text": "psst", "id": "1"}))
            await recv_until(a, lambda e: e["type"] == "ack")
            url = f"{srv.url}rooms/secret/messages"
            assert (await http_get(url))[0] == 401
            assert (await http_get(url, {"Authorization": f"Bearer {token('bob')}"}))[0] == 403
            status, _, body = await http_get(f"{url}?token={token('alice')}")
            assert status == 200
            assert [m["text"] for m in json.loads(body)["messages"]] == ["psst"]
            status, _, body = await http_get(f"{srv.url}rooms")
            assert json.loads(body)["rooms"] == [{"room": "general", "members": 1}]


async def test_python_client_with_tokens() -> None:
    async with serving(jwt_secret=SECRET) as srv:
        with pytest.raises(ChatRejected) as refused:
            async with connect(srv.ws, rooms=["r"], token=token("alice", secret="x" * 40)):
                pass
        assert refused.value.status == 401
        async with connect(srv.ws, rooms=["r"], token=token("alice")) as chat:
            first = await chat.receive()
            assert (first["type"], first["user"]) == ("welcome", "alice")
            assert chat.resume_token == first["resume"]
