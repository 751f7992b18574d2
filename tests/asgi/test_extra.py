"""``chatcore[asgi]`` needs no h11 and no wsproto: ChatApp runs where they cannot be imported.

The ASGI server speaks HTTP and WebSocket; ChatApp shares ``chatcore serve``'s
routes through ``chatcore_host``, never through ``chatcore_server`` (whose
import needs both). A fresh interpreter with a finder that refuses h11 and
wsproto imports ChatApp and drives it through ASGI calls: lifespan, the page,
``/healthz``, ``/metrics``, admin requests (their bodies in chunks), a
WebSocket session.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_SCRIPT = textwrap.dedent(
    """
    import sys

    class Blocker:
        BLOCKED = ("h11", "wsproto")

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.BLOCKED:
                raise ImportError(f"{name} is blocked: chatcore[asgi] must not need it")
            return None

    sys.meta_path.insert(0, Blocker())

    import asyncio
    import json

    from chatcore_asgi import ChatApp

    async def call(app, scope, incoming):
        inbox, out = asyncio.Queue(), []
        for message in incoming:
            inbox.put_nowait(message)

        async def receive():
            return await inbox.get()

        async def send(message):
            out.append(message)

        task = asyncio.create_task(app(scope, receive, send))
        return task, inbox, out

    def http(method, path, body=b"", headers=(), chunk=1000):
        # The body in chunks, as a server passes a large one on.
        pieces = [body[i:i + chunk] for i in range(0, len(body), chunk)] or [b""]
        return {
            "type": "http", "method": method, "path": path, "root_path": "",
            "query_string": b"", "headers": [(b"host", b"x"), *headers],
        }, [
            {"type": "http.request", "body": p, "more_body": n < len(pieces) - 1}
            for n, p in enumerate(pieces)
        ]

    async def request(app, method, path, body=b"", headers=()):
        scope, incoming = http(method, path, body, headers)
        task, _, out = await call(app, scope, incoming)
        await task
        return out[0]["status"], out[1]["body"]

    async def main():
        app = ChatApp(admin_token="t0ken")
        life, inbox, out = await call(app, {"type": "lifespan"}, [{"type": "lifespan.startup"}])
        while not out:
            await asyncio.sleep(0.01)
        assert out[0]["type"] == "lifespan.startup.complete", out
        status, page = await request(app, "GET", "/")
        assert status == 200 and b"static/app.js" in page, status
        assert (await request(app, "GET", "/healthz"))[0] == 200
        auth = [(b"authorization", b"Bearer t0ken")]
        room = json.dumps({"room": "staff", "private": False, "pad": "x" * 2500}).encode()
        assert (await request(app, "POST", "/admin/rooms", room, auth))[0] == 200
        big = json.dumps({"room": "big", "pad": "x" * 20_000}).encode()
        assert (await request(app, "POST", "/admin/rooms", big, auth))[0] == 413
        assert (await request(app, "PUT", "/admin/rooms", room, auth))[0] == 405

        ws = {
            "type": "websocket", "path": "/ws", "root_path": "",
            "query_string": b"user=ann&room=staff", "headers": [(b"host", b"x")],
            "subprotocols": ["chatcore.v1"],
        }
        chat, wsin, frames = await call(app, ws, [{"type": "websocket.connect"}])
        wsin.put_nowait({"type": "websocket.receive", "text": json.dumps(
            {"type": "send", "room": "staff", "text": "hi", "id": "c1"})})
        for _ in range(200):
            if any('"ack"' in m.get("text", "") for m in frames):
                break
            await asyncio.sleep(0.01)
        kinds = [json.loads(m["text"])["type"] for m in frames if "text" in m]
        assert frames[0]["type"] == "websocket.accept", frames
        assert kinds[0] == "welcome" and "ack" in kinds, kinds
        wsin.put_nowait({"type": "websocket.disconnect", "code": 1000, "reason": ""})
        await chat
        status, metrics = await request(app, "GET", "/metrics")
        assert status == 200 and b"chatcore_written_bytes" in metrics

        inbox.put_nowait({"type": "lifespan.shutdown"})
        await life
        assert out[-1]["type"] == "lifespan.shutdown.complete", out
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in (
            "h11", "wsproto", "chatcore_server"))
        assert not loaded, loaded
        print("ok")

    asyncio.run(main())
    """
)


def test_chat_app_runs_without_h11_and_wsproto() -> None:
    paths = [str(ROOT / "src"), str(ROOT / "adapters")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    argv = [sys.executable, "-c", _SCRIPT]
    done = subprocess.run(argv, check=False, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
