"""``chatcore admin ...`` and ``chatcore rooms create --url`` against a running server."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import anyio
import pytest

from chatcore_server.cli import main

from .conftest import JSON, close_code, recv_until, serving, welcome, ws_connect

pytestmark = pytest.mark.anyio

TOKEN = "cli-admin-token"


async def chatcore(*argv: str) -> tuple[int, str, str]:
    """Run the ``chatcore`` command line in a thread: status, stdout, stderr."""

    def run() -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = main(list(argv))
        return status, out.getvalue(), err.getvalue()

    return await anyio.to_thread.run_sync(run)


async def test_rooms_create_with_a_url_changes_the_room_live() -> None:
    async with (
        serving(admin_token=TOKEN) as srv,
        ws_connect(f"{srv.ws}?user=alice&room=staff", **JSON) as alice,
        ws_connect(f"{srv.ws}?user=bob&room=staff", **JSON) as bob,
    ):
        await welcome(alice)
        await welcome(bob)
        status, out, err = await chatcore(
            "rooms", "create", "staff", "--private", "--allow", "alice",
            "--url", srv.url, "--token", TOKEN,
        )  # fmt: skip
        assert (status, err) == (0, "")
        assert "applied by the running server" in out
        seen = await recv_until(bob, lambda e: e["type"] == "error")
        assert seen[-1]["code"] == "forbidden"
        assert srv.server.engine.members("staff") == ("alice",)


async def test_rooms_list_with_a_url_lists_what_the_running_server_holds() -> None:
    async with (
        serving(admin_token=TOKEN) as srv,
        ws_connect(f"{srv.ws}?user=alice&room=ops", **JSON) as alice,
    ):
        await welcome(alice)
        status, out, err = await chatcore("rooms", "list", "--url", srv.url, "--token", TOKEN)
        assert (status, err) == (0, "")
        rooms = json.loads(out)["rooms"]
        assert "ops" in {r["room"] for r in rooms}, rooms
        status, _, err = await chatcore("rooms", "list", "--url", srv.url, "--token", "nope")
        assert status == 1
        assert "403" in err


async def test_rooms_create_without_a_url_edits_the_database_and_says_so(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'chat.db'}"
    status, out, _ = await chatcore("rooms", "create", "staff", "--private", "--db", db)
    assert status == 0
    assert "next loaded" in out


async def test_admin_verbs_reach_the_users() -> None:
    async with (
        serving(admin_token=TOKEN) as srv,
        ws_connect(f"{srv.ws}?user=alice&room=lobby", **JSON) as alice,
        ws_connect(f"{srv.ws}?user=bob&room=lobby", **JSON) as bob,
    ):
        await welcome(alice)
        await welcome(bob)
        auth = ("--url", srv.url, "--token", TOKEN)
        assert (await chatcore("admin", "post", "lobby", "hi all", "--sender", "bot", *auth))[
            0
        ] == 0
        seen = await recv_until(alice, lambda e: e["type"] == "message")
        assert (seen[-1]["from"], seen[-1]["offset"]) == ("bot", 1)
        assert (await chatcore("admin", "delete", "lobby", "1", *auth))[0] == 0
        await recv_until(alice, lambda e: e["type"] == "deleted")
        assert (await chatcore("admin", "mute", "lobby", "bob", "60", *auth))[0] == 0
        assert "bob" in srv.server.engine.moderation("lobby")[1]
        status, out, _ = await chatcore("admin", "list", "sessions", *auth)
        assert status == 0
        assert '"user": "bob"' in out
        assert (await chatcore("admin", "ban", "lobby", "bob", "--reason", "spam", *auth))[0] == 0
        seen = await recv_until(bob, lambda e: e["type"] == "removed")
        assert seen[-1]["reason"] == "spam"
        assert (await chatcore("admin", "remove", "bob", "--reason", "bye", *auth))[0] == 0
        assert await close_code(bob) == 4003


async def test_a_wrong_token_is_an_error_and_changes_nothing() -> None:
    async with (
        serving(admin_token=TOKEN) as srv,
        ws_connect(f"{srv.ws}?user=bob&room=lobby", **JSON) as bob,
    ):
        await welcome(bob)
        status, _, err = await chatcore(
            "admin", "ban", "lobby", "bob", "--url", srv.url, "--token", "nope"
        )
        assert status == 1
        assert err == "error: 403 invalid admin token\n"
        assert srv.server.engine.members("lobby") == ("bob",)
