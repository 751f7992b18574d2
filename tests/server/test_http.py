"""The plain HTTP side: the browser client, health, rooms, history, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import JSON, http_get, raw_exchange, recv_until, serving, welcome, ws_connect

pytestmark = pytest.mark.anyio


async def test_static_files_with_their_content_types(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<!doctype html><html><body>chat</body></html>")
    (tmp_path / "app.js").write_text("console.log('hi')")
    (tmp_path / "app.css").write_text("body { margin: 0 }")
    (tmp_path / "icon.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    (tmp_path.parent / "secret.txt").write_text("outside the static folder")
    async with serving(static_dir=tmp_path) as srv:
        status, headers, body = await http_get(srv.url)
        assert status == 200
        assert headers["content-type"] == "text/html; charset=utf-8"
        assert body == (tmp_path / "index.html").read_bytes()
        kinds = {"app.js": "text/javascript", "app.css": "text/css", "icon.svg": "image/svg+xml"}
        for name, kind in kinds.items():
            status, headers, body = await http_get(f"{srv.url}static/{name}")
            assert status == 200
            assert headers["content-type"].startswith(kind)
            assert body == (tmp_path / name).read_bytes()
        for path in ("static/..%2Fsecret.txt", "static/nope.js", "nope"):
            status, headers, body = await http_get(f"{srv.url}{path}")
            assert status == 404
            assert headers["content-type"] == "application/json"
            assert json.loads(body)["error"]["status"] == 404


async def test_health_rooms_and_history_pages() -> None:
    async with serving() as srv:
        status, _, body = await http_get(f"{srv.url}healthz")
        assert (status, json.loads(body)["status"]) == (200, "ok")
        srv.server.create_room("staff", allow={"alice"})
        async with (
            ws_connect(f"{srv.ws}?user=alice&room=general&room=staff", **JSON) as alice,
            ws_connect(f"{srv.ws}?user=bob&room=general", **JSON) as bob,
        ):
            await welcome(alice)
            await welcome(bob)
            for i in range(5):
                frame = {"type": "send", "room": "general", "text": f"m{i}", "id": f"c{i}"}
                await alice.send(json.dumps(frame))
            await alice.send(json.dumps({"type": "send", "room": "staff", "text": "s", "id": "s"}))
            await recv_until(alice, lambda e: e.get("id") == "s")
            status, _, body = await http_get(f"{srv.url}rooms")
            assert json.loads(body) == {"rooms": [{"room": "general", "members": 2}]}
            status, _, body = await http_get(f"{srv.url}rooms/general/messages?limit=2")
            page = json.loads(body)
            assert [m["text"] for m in page["messages"]] == ["m3", "m4"]
            assert page["more"] is True
            status, _, body = await http_get(f"{srv.url}rooms/general/messages?before=4&limit=10")
            page = json.loads(body)
            assert [m["offset"] for m in page["messages"]] == [1, 2, 3]
            assert page["more"] is False
            assert page["messages"][0]["from"] == "alice"
            # Without authentication the user parameter names the reader.
            url = f"{srv.url}rooms/staff/messages"
            assert (await http_get(url))[0] == 401
            assert (await http_get(f"{url}?user=bob"))[0] == 403
            assert (await http_get(f"{url}?user=alice"))[0] == 200
            for bad in ("rooms/general/messages?limit=x", "rooms/general/messages?before=0"):
                status, _, body = await http_get(f"{srv.url}{bad}")
                assert status == 400
                assert "error" in json.loads(body)
        status, _, body = await http_get(f"{srv.url}rooms/never-used/messages")
        assert (status, json.loads(body)["messages"]) == (200, [])


async def test_other_methods_get_405_and_keep_alive_serves_several_requests() -> None:
    async with serving() as srv:
        post = (
            b"POST /rooms HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
        )
        out = await raw_exchange(srv.port, post)
        assert out.startswith(b"HTTP/1.1 405 ")
        assert b"allow: get, head" in out.lower()
        two = (
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /rooms HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        out = await raw_exchange(srv.port, two)
        assert out.count(b"HTTP/1.1 200 OK") == 2
        assert b'{"rooms":[]}' in out
