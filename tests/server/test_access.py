"""Who may join, read and send, through every path of a real server, as a matrix.

Users: member (in the room, connected with it), allowed (may enter, not in it),
stranger, anonymous (no name, no token), bad (a token signed with another
secret; without tokens, an invalid user name). Rooms: public, private, DM.
Paths: WebSocket join / history / send and the HTTP history route, each with
and without ``--jwt-secret``. Outcomes are HTTP-like: 200 done, 400 refused as
malformed, 401 say who you are, 403 not for you (``forbidden`` on a WebSocket).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import jwt
import pytest
from websockets.exceptions import InvalidStatus

from chatcore import Append, SaveRoom
from chatcore_store import MemoryStore, open_store

from .conftest import JSON, http_get, recv, recv_until, serving, welcome, ws_connect

pytestmark = pytest.mark.anyio

SECRET = "access-test-secret-long-enough-for-hs256"
T0 = 1_795_000_000_000

ROOMS = {"public": "lobby", "private": "staff", "dm": "dm:alice:bob"}
USERS = {"member": "alice", "allowed": "bob", "stranger": "mallory", "anonymous": None}
PATHS = ["ws_join", "ws_history", "ws_send", "http"]


def expected(who: str, kind: str, path: str, jwt_on: bool) -> int:
    if who in ("member", "allowed"):
        return 200
    if who == "stranger":
        return 200 if kind == "public" else 403
    if who == "bad":
        return 401 if jwt_on else 400
    # anonymous
    if jwt_on:
        return 401  # with tokens on, everything needs one: public history too
    if path != "http":
        return 400  # a WebSocket needs a user parameter
    return 200 if kind == "public" else 401


def credentials(who: str, jwt_on: bool) -> str:
    """The query string part that says who is asking."""
    if who == "anonymous":
        return ""
    if who == "bad":
        if jwt_on:
            forged = jwt.encode({"sub": "alice"}, "x" * 40, algorithm="HS256")
            return f"token={forged}"
        return "user=" + quote("not a name")
    user = USERS[who]
    assert user is not None
    if jwt_on:
        return "token=" + jwt.encode({"sub": user}, SECRET, algorithm="HS256")
    return f"user={user}"


async def stored_store() -> MemoryStore:
    """A store holding one message in each room, as the server left it; the DM
    room is stored the way a store creates it from its first message."""
    store = MemoryStore()
    await store.execute(
        [
            SaveRoom(room="staff", private=True, allow=frozenset({"alice", "bob"})),
            Append(ref=1, room="lobby", sender="alice", text="hello lobby", ts=T0),
            Append(ref=2, room="staff", sender="alice", text="hello staff", ts=T0),
            Append(ref=3, room="dm:alice:bob", sender="alice", text="hello bob", ts=T0),
        ]
    )
    return store


async def over_http(url: str, room: str, who: str, jwt_on: bool) -> tuple[int, list[str]]:
    query = credentials(who, jwt_on)
    status, headers, body = await http_get(f"{url}rooms/{quote(room)}/messages?{query}")
    page = json.loads(body)
    if status == 401 and jwt_on:
        assert headers.get("www-authenticate") == "Bearer"
    texts = [m["text"] for m in page["messages"]] if status == 200 else []
    if status != 200:
        assert "messages" not in page
        assert "error" in page
    return status, texts


async def over_websocket(
    ws: str, room: str, who: str, path: str, jwt_on: bool
) -> tuple[int, list[str]]:
    query = credentials(who, jwt_on)
    if who == "member":
        query += f"&room={quote(room)}"
    try:
        async with ws_connect(f"{ws}?{query}", **JSON) as conn:
            first = await recv(conn)
            assert first["type"] == "welcome", first
            if who == "member":
                await recv_until(conn, lambda e: e["type"] == "members")
            return await _act(conn, room, who, path)
    except InvalidStatus as refused:
        return refused.response.status_code, []


async def _act(conn: Any, room: str, who: str, path: str) -> tuple[int, list[str]]:
    def answer(kind: str, ref: str) -> Any:
        return lambda e: e["type"] == kind or (e["type"] == "error" and e.get("ref") == ref)

    def outcome(event: dict[str, Any]) -> int:
        if event["type"] != "error":
            return 200
        return 403 if event["code"] == "forbidden" else 500

    if path == "ws_join":
        await conn.send(json.dumps({"type": "join", "room": room}))
        got = (await recv_until(conn, answer("members", room)))[-1]
        return outcome(got), []
    if path == "ws_history":
        await conn.send(json.dumps({"type": "history", "room": room}))
        got = (await recv_until(conn, answer("history", room)))[-1]
        return outcome(got), [m["text"] for m in got.get("messages", [])]
    # ws_send: a member sends; anyone else joins first, as a client must.
    if who != "member":
        await conn.send(json.dumps({"type": "join", "room": room}))
        joined = (await recv_until(conn, answer("members", room)))[-1]
        if joined["type"] == "error":
            await conn.send(json.dumps({"type": "send", "room": room, "text": "x", "id": "s"}))
            refused = (await recv_until(conn, answer("ack", "s")))[-1]
            assert refused["type"] == "error", refused
            return outcome(joined), []
    await conn.send(json.dumps({"type": "send", "room": room, "text": "x", "id": "s"}))
    got = (await recv_until(conn, answer("ack", "s")))[-1]
    return outcome(got), []


@pytest.mark.parametrize("jwt_on", [False, True], ids=["open", "jwt"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", list(ROOMS))
@pytest.mark.parametrize("who", [*USERS, "bad"])
async def test_access_matrix(who: str, kind: str, path: str, jwt_on: bool) -> None:
    room = ROOMS[kind]
    store = await stored_store()
    async with serving(store=store, jwt_secret=SECRET if jwt_on else None) as srv:
        if path == "http":
            status, texts = await over_http(srv.url, room, who, jwt_on)
        else:
            status, texts = await over_websocket(srv.ws, room, who, path, jwt_on)
    want = expected(who, kind, path, jwt_on)
    assert status == want, f"{who} {path} {room}: {status}, expected {want}"
    if path in ("http", "ws_history"):
        hello = {"public": "hello lobby", "private": "hello staff", "dm": "hello bob"}[kind]
        assert texts == ([hello] if want == 200 else [])
    stored = [m.sender for m in await store.history(room)]
    sent = path == "ws_send" and want == 200
    assert stored == (["alice", USERS[who]] if sent else ["alice"])


async def test_rooms_create_on_a_running_server_says_when_it_applies(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'chat.db'}"
    async with serving(store=open_store(url)) as srv:
        async with ws_connect(f"{srv.ws}?user=alice&room=ops", **JSON) as alice:
            await welcome(alice)
            command = ["rooms", "create", "ops", "--private", "--allow", "bob", "--db", url]
            made = await anyio.to_thread.run_sync(
                lambda: subprocess.run(
                    [sys.executable, "-m", "chatcore_store", *command],
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=False,
                )
            )
            assert made.returncode == 0, made.stderr
            # What the command prints is what happens: alice, in the room, stays in it...
            assert "next loaded" in made.stdout
            await alice.send(json.dumps({"type": "send", "room": "ops", "text": "t", "id": "1"}))
            assert (await recv_until(alice, lambda e: e.get("id") == "1"))[-1]["type"] == "ack"
        # ...and once everyone has left, the room is loaded again with the new rule.
        async with ws_connect(f"{srv.ws}?user=alice", **JSON) as alice:
            await welcome(alice)
            await alice.send(json.dumps({"type": "join", "room": "ops"}))
            got = await recv_until(alice, lambda e: e["type"] in ("members", "error"))
            assert (got[-1]["type"], got[-1].get("code")) == ("error", "forbidden")
