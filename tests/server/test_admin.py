"""The admin API against a real server: credentials, and each action as a client sees it."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

import anyio
import jwt
import pytest

from chatcore import LocalProtocolError

from .conftest import GUARD, JSON, close_code, recv_until, serving, welcome, ws_connect

pytestmark = pytest.mark.anyio

TOKEN = "s3cret-admin"
SECRET = "jwt-secret-for-tests-0123456789abcdef"


async def admin(
    url: str, method: str, path: str, body: Any = None, *, token: str | None = TOKEN
) -> tuple[int, Any]:
    """One admin request with urllib (in a thread): status, decoded JSON body."""

    def call() -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"content-type": "application/json"}
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
        req = urllib.request.Request(url + path.lstrip("/"), data, headers, method=method)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(req, timeout=GUARD) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    return await anyio.to_thread.run_sync(call)


# Every endpoint, with a body that would be valid.
ENDPOINTS = [
    ("GET", "/admin/rooms", None),
    ("POST", "/admin/rooms", {"room": "staff", "private": True, "allow": ["alice"]}),
    ("GET", "/admin/rooms/lobby", None),
    ("GET", "/admin/sessions", None),
    ("POST", "/admin/rooms/lobby/remove", {"user": "bob"}),
    ("POST", "/admin/users/bob/remove", {"reason": "x"}),
    ("POST", "/admin/rooms/lobby/mute", {"user": "bob", "seconds": 60}),
    ("POST", "/admin/rooms/lobby/ban", {"user": "bob"}),
    ("POST", "/admin/rooms/lobby/unban", {"user": "bob"}),
    ("POST", "/admin/rooms/lobby/messages", {"text": "hi", "sender": "bot"}),
    ("DELETE", "/admin/rooms/lobby/messages/1", None),
]


async def test_every_endpoint_refuses_no_token_401_and_a_wrong_one_403() -> None:
    async with (
        serving(admin_token=TOKEN) as srv,
        ws_connect(f"{srv.ws}?user=bob&room=lobby", **JSON) as bob,
    ):
        await welcome(bob)
        for method, path, body in ENDPOINTS:
            status, answer = await admin(srv.url, method, path, body, token=None)
            assert status == 401, (method, path, answer)
            status, answer = await admin(srv.url, method, path, body, token="wrong")
            assert status == 403, (method, path, answer)
            assert answer["error"]["message"] == "invalid admin token"
        # Nothing happened to bob: still in the room, still connected, never told.
        assert srv.server.engine.members("lobby") == ("bob",)
        assert srv.server.engine.rooms()["lobby"].head == 0
        assert "staff" not in srv.server.engine.rooms()


async def test_without_an_admin_token_the_api_is_off() -> None:
    async with serving() as srv:
        status, answer = await admin(srv.url, "GET", "/admin/rooms", token="anything")
        assert status == 403
        assert "--admin-token" in answer["error"]["message"]


async def test_a_jwt_with_the_admin_claim_is_an_admin_credential() -> None:
    admin_jwt = jwt.encode({"sub": "root", "admin": True}, SECRET, algorithm="HS256")
    user_jwt = jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256")
    async with serving(jwt_secret=SECRET) as srv:
        assert (await admin(srv.url, "GET", "/admin/rooms", token=admin_jwt))[0] == 200
        status, answer = await admin(srv.url, "GET", "/admin/rooms", token=user_jwt)
        assert status == 403
        assert answer["error"]["message"] == "this token has no admin claim"


async def test_making_a_room_private_removes_members_no_longer_allowed() -> None:
    async with (
        serving(admin_token=TOKEN) as srv,
        ws_connect(f"{srv.ws}?user=alice&room=staff", **JSON) as alice,
        ws_connect(f"{srv.ws}?user=bob&room=staff", **JSON) as bob,
    ):
        await welcome(alice)
        await welcome(bob)
        body = {"room": "staff", "private": True, "allow": ["alice"]}
        assert (await admin(srv.url, "POST", "/admin/rooms", body))[0] == 200
        seen = await recv_until(bob, lambda e: e["type"] == "error")
        assert seen[-1]["code"] == "forbidden"
        assert srv.server.engine.members("staff") == ("alice",)
        status, listed = await admin(srv.url, "GET", "/admin/rooms")
        assert status == 200
        assert listed["rooms"] == [
            {"room": "staff", "private": True, "allow": ["alice"], "head": 0, "members": 1}
        ]
        status, room = await admin(srv.url, "GET", "/admin/rooms/staff")
        assert (status, room["members"], room["private"]) == (200, ["alice"], True)
        status, sessions = await admin(srv.url, "GET", "/admin/sessions")
        assert sorted(s["user"] for s in sessions["sessions"]) == ["alice", "bob"]


async def test_remove_from_a_room_and_from_the_server() -> None:
    async with (
        serving(admin_token=TOKEN) as srv,
        ws_connect(f"{srv.ws}?user=alice&room=lobby", **JSON) as alice,
        ws_connect(f"{srv.ws}?user=bob&room=lobby", **JSON) as bob,
    ):
        await welcome(alice)
        await welcome(bob)
        body = {"user": "bob", "reason": "cool off"}
        assert (await admin(srv.url, "POST", "/admin/rooms/lobby/remove", body))[0] == 200
        seen = await recv_until(bob, lambda e: e["type"] == "removed")
        assert seen[-1] == {"type": "removed", "room": "lobby", "reason": "cool off"}
        body = {"reason": "abuse"}
        assert (await admin(srv.url, "POST", "/admin/users/bob/remove", body))[0] == 200
        seen = await recv_until(bob, lambda e: e["type"] == "removed")
        assert seen[-1] == {"type": "removed", "room": None, "reason": "abuse"}
        assert await close_code(bob) == 4003
        assert srv.server.engine.sessions("bob") == []


async def test_mute_ban_unban_post_and_delete_as_a_client_sees_them() -> None:
    async with (
        serving(admin_token=TOKEN) as srv,
        ws_connect(f"{srv.ws}?user=alice&room=lobby", **JSON) as alice,
        ws_connect(f"{srv.ws}?user=bob&room=lobby", **JSON) as bob,
    ):
        await welcome(alice)
        await welcome(bob)
        body = {"user": "bob", "seconds": 60}
        assert (await admin(srv.url, "POST", "/admin/rooms/lobby/mute", body))[0] == 200
        await bob.send(json.dumps({"type": "send", "room": "lobby", "text": "hi", "id": "b"}))
        seen = await recv_until(bob, lambda e: e["type"] == "error")
        assert seen[-1]["code"] == "forbidden"
        assert seen[-1]["message"].startswith("muted in room lobby")
        body = {"user": "bob", "seconds": 0}
        assert (await admin(srv.url, "POST", "/admin/rooms/lobby/mute", body))[0] == 200

        body = {"text": "maintenance at noon", "sender": "system"}
        assert (await admin(srv.url, "POST", "/admin/rooms/lobby/messages", body))[0] == 200
        seen = await recv_until(alice, lambda e: e["type"] == "message")
        assert (seen[-1]["from"], seen[-1]["offset"]) == ("system", 1)

        status, _ = await admin(srv.url, "DELETE", "/admin/rooms/lobby/messages/1")
        assert status == 200
        seen = await recv_until(alice, lambda e: e["type"] == "deleted")
        assert seen[-1] == {"type": "deleted", "room": "lobby", "offset": 1}
        status, _ = await admin(srv.url, "DELETE", "/admin/rooms/lobby/messages/2")
        assert status == 404  # there is no message 2 yet

        assert (await admin(srv.url, "POST", "/admin/rooms/lobby/ban", {"user": "bob"}))[0] == 200
        seen = await recv_until(bob, lambda e: e["type"] == "removed")
        await bob.send(json.dumps({"type": "join", "room": "lobby"}))
        seen = await recv_until(bob, lambda e: e["type"] == "error")
        assert seen[-1]["message"] == "banned from room lobby"
        status, room = await admin(srv.url, "GET", "/admin/rooms/lobby")
        assert room["banned"] == ["bob"]
        assert (await admin(srv.url, "POST", "/admin/rooms/lobby/unban", {"user": "bob"}))[0] == 200
        await bob.send(json.dumps({"type": "join", "room": "lobby"}))
        seen = await recv_until(bob, lambda e: e["type"] == "members")
        assert seen[-1]["users"] == ["alice", "bob"]


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/admin/rooms", {"room": "bad room!"}, 400),
        ("POST", "/admin/rooms", {"room": "ok", "allow": "alice"}, 400),
        ("POST", "/admin/rooms/lobby/mute", {"user": "bob", "seconds": -1}, 400),
        ("POST", "/admin/rooms/lobby/mute", {"user": "bob", "seconds": "10"}, 400),
        ("POST", "/admin/rooms/lobby/ban", {"user": "no such name!"}, 400),
        ("POST", "/admin/rooms/lobby/ban", [1, 2], 400),
        ("POST", "/admin/rooms/lobby/messages", {"text": ""}, 400),
        ("POST", "/admin/rooms/lobby/messages", {"text": "\x01e2e:{}"}, 400),
        ("POST", "/admin/rooms/dm:alice:bob/messages", {"text": "\x01e2e:{}"}, 400),
        ("GET", "/admin/rooms/nowhere", None, 404),
        ("GET", "/admin/nothing", None, 404),
        ("DELETE", "/admin/rooms/lobby/messages/5", None, 404),
        ("GET", "/admin/rooms/lobby/ban", None, 405),
        ("POST", "/admin/rooms/lobby/messages", {"text": "x" * 20_000}, 413),
    ],
)
async def test_bad_requests_get_their_status(
    method: str, path: str, body: Any, status: int
) -> None:
    async with serving(admin_token=TOKEN) as srv:
        got, answer = await admin(srv.url, method, path, body)
        assert got == status, answer
        assert answer["error"]["status"] == status


async def test_an_admin_post_cannot_pass_for_an_encrypted_message() -> None:
    async with (
        serving(admin_token=TOKEN) as srv,
        ws_connect(f"{srv.ws}?user=alice&room=lobby", **JSON) as alice,
    ):
        await welcome(alice)
        forged = {"text": "\x01e2e:" + json.dumps({"v": 1, "device": "d", "payloads": {}})}
        got, answer = await admin(srv.url, "POST", "/admin/rooms/dm:alice:bob/messages", forged)
        assert got == 400
        assert "encryption marker" in answer["error"]["message"]
        got, _ = await admin(srv.url, "POST", "/admin/rooms/lobby/messages", {"text": "ok"})
        assert got == 200
        seen = await recv_until(alice, lambda e: e["type"] == "message")
        assert [e["text"] for e in seen if e["type"] == "message"] == ["ok"]
        with pytest.raises(LocalProtocolError, match="encryption marker"):
            srv.server.post("lobby", "\x01e2e:{}", sender="bot")


async def test_the_embedding_api_does_what_the_admin_api_does() -> None:
    async with (
        serving() as srv,
        ws_connect(f"{srv.ws}?user=alice&room=lobby", **JSON) as alice,
        ws_connect(f"{srv.ws}?user=bob&room=lobby", **JSON) as bob,
    ):
        server = srv.server
        await welcome(alice)
        await welcome(bob)
        server.post("lobby", "hello from the host", sender="bot")
        seen = await recv_until(alice, lambda e: e["type"] == "message")
        assert (seen[-1]["from"], seen[-1]["text"]) == ("bot", "hello from the host")
        server.delete_message("lobby", 1)
        seen = await recv_until(alice, lambda e: e["type"] == "deleted")
        server.mute("lobby", "bob", 30)
        assert server.engine.moderation("lobby")[1]["bob"] > time.time()
        server.ban("lobby", "bob")
        await recv_until(bob, lambda e: e["type"] == "removed")
        server.unban("lobby", "bob")
        assert server.engine.moderation("lobby")[0] == frozenset()
        server.remove("bob", reason="bye")
        assert await close_code(bob) == 4003
