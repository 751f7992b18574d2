"""History kept in SQLite survives a server restart; HTTP history reads it back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatcore_store import open_store

from .conftest import JSON, http_get, recv_until, serving, welcome, ws_connect

pytestmark = pytest.mark.anyio


async def test_history_survives_a_restart(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'chat.db'}"
    async with (
        serving(store=open_store(url)) as srv,
        ws_connect(f"{srv.ws}?user=alice&room=general", **JSON) as alice,
    ):
        await welcome(alice)
        for i in range(3):
            frame = {"type": "send", "room": "general", "text": f"kept {i}", "id": f"k{i}"}
            await alice.send(json.dumps(frame))
        await recv_until(alice, lambda e: e.get("id") == "k2")
    # A new server on the same file: the messages and their offsets are still there.
    async with serving(store=open_store(url)) as srv:
        status, _, body = await http_get(f"{srv.url}rooms/general/messages")
        assert status == 200
        page = json.loads(body)
        assert [(m["offset"], m["text"]) for m in page["messages"]] == [
            (1, "kept 0"),
            (2, "kept 1"),
            (3, "kept 2"),
        ]
        async with ws_connect(f"{srv.ws}?user=bob&room=general", **JSON) as bob:
            w = await welcome(bob)
            assert w["rooms"]["general"]["offset"] == 3
