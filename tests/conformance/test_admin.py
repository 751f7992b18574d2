"""The admin API (protocol.md, "Admin API"), against every server: credentials, and each
action as a client sees it.

What the engine holds is read back through the admin API itself (``GET
/admin/rooms/ROOM``, ``GET /admin/sessions``), so the same test runs against
``chatcore serve`` and ``ChatApp`` under uvicorn and hypercorn.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import anyio
import pytest

from .conftest import Options, Server
from .wire import GUARD, close_code, hs256, is_type, recv_until, send, unique, welcome, ws_open

pytestmark = pytest.mark.anyio

TOKEN = "s3cret-admin"
SECRET = "jwt-secret-for-tests-0123456789abcdef"
SERVER_OPTIONS = Options(admin_token=TOKEN)


async def admin(
    server: Server, method: str, path: str, body: Any = None, *, token: str | None = TOKEN
) -> tuple[int, Any]:
    """One admin request with urllib (in a thread): status, decoded JSON body."""

    def call() -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"content-type": "application/json"}
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
        url = server.url + path.lstrip("/")
        req = urllib.request.Request(url, data, headers, method=method)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(req, timeout=GUARD) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    return await anyio.to_thread.run_sync(call)


async def room_state(server: Server, room: str) -> dict[str, Any]:
    status, found = await admin(server, "GET", f"/admin/rooms/{room}")
    assert status == 200, found
    return dict(found)


def endpoints(room: str, user: str) -> list[tuple[str, str, Any]]:
    """Every endpoint, with a body that would be valid."""
    return [
        ("GET", "/admin/rooms", None),
        ("POST", "/admin/rooms", {"room": unique("staff"), "private": True, "allow": [user]}),
        ("GET", f"/admin/rooms/{room}", None),
        ("GET", "/admin/sessions", None),
        ("POST", f"/admin/rooms/{room}/remove", {"user": user}),
        ("POST", f"/admin/users/{user}/remove", {"reason": "x"}),
        ("POST", f"/admin/rooms/{room}/mute", {"user": user, "seconds": 60}),
        ("POST", f"/admin/rooms/{room}/ban", {"user": user}),
        ("POST", f"/admin/rooms/{room}/unban", {"user": user}),
        ("POST", f"/admin/rooms/{room}/messages", {"text": "hi", "sender": "bot"}),
        ("DELETE", f"/admin/rooms/{room}/messages/1", None),
    ]


async def test_every_endpoint_refuses_no_token_401_and_a_wrong_one_403(server: Server) -> None:
    bob, lobby = unique("bob"), unique("lobby")
    async with ws_open(server.ws(f"user={bob}&room={lobby}")) as conn:
        await welcome(conn)
        for method, path, body in endpoints(lobby, bob):
            status, answer = await admin(server, method, path, body, token=None)
            assert status == 401, (method, path, answer)
            status, answer = await admin(server, method, path, body, token="wrong")
            assert status == 403, (method, path, answer)
            assert answer["error"]["message"] == "invalid admin token"
        # Nothing happened to bob: still in the room, which has no message.
        state = await room_state(server, lobby)
        assert (state["members"], state["head"]) == ([bob], 0)


async def test_without_an_admin_token_the_api_is_off(
    start_server: Any,
) -> None:
    server = start_server(Options(store="memory"))
    status, answer = await admin(server, "GET", "/admin/rooms", token="anything")
    assert status == 403
    assert "--admin-token" in answer["error"]["message"]


async def test_a_jwt_with_the_admin_claim_is_an_admin_credential(start_server: Any) -> None:
    server = start_server(Options(store="memory", jwt_secret=SECRET))
    admin_jwt = hs256(SECRET, {"sub": "root", "admin": True})
    user_jwt = hs256(SECRET, {"sub": "alice"})
    assert (await admin(server, "GET", "/admin/rooms", token=admin_jwt))[0] == 200
    status, answer = await admin(server, "GET", "/admin/rooms", token=user_jwt)
    assert status == 403
    assert answer["error"]["message"] == "this token has no admin claim"
    room = {"room": unique("made"), "private": False}
    assert (await admin(server, "POST", "/admin/rooms", room, token=admin_jwt))[0] == 200
    assert (await admin(server, "POST", "/admin/rooms", room, token=user_jwt))[0] == 403


async def test_making_a_room_private_removes_members_no_longer_allowed(server: Server) -> None:
    alice, bob, staff = unique("alice"), unique("bob"), unique("staff")
    async with (
        ws_open(server.ws(f"user={alice}&room={staff}")) as a,
        ws_open(server.ws(f"user={bob}&room={staff}")) as b,
    ):
        await welcome(a)
        await welcome(b)
        body = {"room": staff, "private": True, "allow": [alice]}
        assert (await admin(server, "POST", "/admin/rooms", body))[0] == 200
        seen = await recv_until(b, is_type("error"))
        assert seen[-1]["code"] == "forbidden"
        status, listed = await admin(server, "GET", "/admin/rooms")
        assert status == 200
        assert {"room": staff, "private": True, "allow": [alice], "head": 0, "members": 1} in (
            listed["rooms"]
        )
        state = await room_state(server, staff)
        assert (state["members"], state["private"]) == ([alice], True)
        status, sessions = await admin(server, "GET", "/admin/sessions")
        users = {s["user"] for s in sessions["sessions"]}
        assert {alice, bob} <= users


async def test_remove_from_a_room_and_from_the_server(server: Server) -> None:
    alice, bob, lobby = unique("alice"), unique("bob"), unique("lobby")
    async with (
        ws_open(server.ws(f"user={alice}&room={lobby}")) as a,
        ws_open(server.ws(f"user={bob}&room={lobby}")) as b,
    ):
        await welcome(a)
        await welcome(b)
        body = {"user": bob, "reason": "cool off"}
        assert (await admin(server, "POST", f"/admin/rooms/{lobby}/remove", body))[0] == 200
        seen = await recv_until(b, is_type("removed"))
        assert seen[-1] == {"type": "removed", "room": lobby, "reason": "cool off"}
        body = {"reason": "abuse"}
        assert (await admin(server, "POST", f"/admin/users/{bob}/remove", body))[0] == 200
        seen = await recv_until(b, is_type("removed"))
        assert seen[-1] == {"type": "removed", "room": None, "reason": "abuse"}
        assert await close_code(b) == 4003
        _, sessions = await admin(server, "GET", "/admin/sessions")
        assert bob not in {s["user"] for s in sessions["sessions"]}


async def test_mute_ban_unban_post_and_delete_as_a_client_sees_them(server: Server) -> None:
    alice, bob, lobby = unique("alice"), unique("bob"), unique("lobby")
    async with (
        ws_open(server.ws(f"user={alice}&room={lobby}")) as a,
        ws_open(server.ws(f"user={bob}&room={lobby}")) as b,
    ):
        await welcome(a)
        await welcome(b)
        room = f"/admin/rooms/{lobby}"
        assert (await admin(server, "POST", f"{room}/mute", {"user": bob, "seconds": 60}))[0] == 200
        assert bob in (await room_state(server, lobby))["muted"]
        await send(b, type="send", room=lobby, text="hi", id="b")
        seen = await recv_until(b, is_type("error"))
        assert seen[-1]["code"] == "forbidden"
        assert seen[-1]["message"].startswith(f"muted in room {lobby}")
        assert (await admin(server, "POST", f"{room}/mute", {"user": bob, "seconds": 0}))[0] == 200

        body = {"text": "maintenance at noon", "sender": "system"}
        assert (await admin(server, "POST", f"{room}/messages", body))[0] == 200
        seen = await recv_until(a, is_type("message"))
        assert (seen[-1]["from"], seen[-1]["offset"]) == ("system", 1)

        assert (await admin(server, "DELETE", f"{room}/messages/1"))[0] == 200
        seen = await recv_until(a, is_type("deleted"))
        assert seen[-1] == {"type": "deleted", "room": lobby, "offset": 1}
        assert (await admin(server, "DELETE", f"{room}/messages/2"))[0] == 404  # none yet

        assert (await admin(server, "POST", f"{room}/ban", {"user": bob}))[0] == 200
        await recv_until(b, is_type("removed"))
        await send(b, type="join", room=lobby)
        seen = await recv_until(b, is_type("error"))
        assert seen[-1]["message"] == f"banned from room {lobby}"
        assert (await room_state(server, lobby))["banned"] == [bob]
        assert (await admin(server, "POST", f"{room}/unban", {"user": bob}))[0] == 200
        await send(b, type="join", room=lobby)
        seen = await recv_until(b, is_type("members"))
        assert seen[-1]["users"] == sorted([alice, bob])


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
        ("PUT", "/admin/rooms", {"room": "x"}, 405),
        ("POST", "/admin/rooms/lobby/messages", {"text": "x" * 20_000}, 413),
        ("POST", "/rooms", {"room": "x"}, 405),
    ],
)
async def test_bad_requests_get_their_status(
    server: Server, method: str, path: str, body: Any, status: int
) -> None:
    got, answer = await admin(server, method, path, body)
    assert got == status, answer
    assert answer["error"]["status"] == status


async def test_an_admin_post_cannot_pass_for_an_encrypted_message(server: Server) -> None:
    alice, lobby = unique("alice"), unique("lobby")
    async with ws_open(server.ws(f"user={alice}&room={lobby}")) as ws:
        await welcome(ws)
        forged = {"text": "\x01e2e:" + json.dumps({"v": 1, "device": "d", "payloads": {}})}
        got, answer = await admin(server, "POST", f"/admin/rooms/dm:{alice}:zed/messages", forged)
        assert got == 400
        assert "encryption marker" in answer["error"]["message"]
        got, _ = await admin(server, "POST", f"/admin/rooms/{lobby}/messages", {"text": "ok"})
        assert got == 200
        seen = await recv_until(ws, is_type("message"))
        assert [e["text"] for e in seen if e["type"] == "message"] == ["ok"]
