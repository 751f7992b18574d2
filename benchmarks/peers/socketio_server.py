"""Room broadcast with python-socketio on aiohttp, WebSocket transport only:
``enter_room`` at connect, ``emit(..., room=, skip_sid=)`` per message, as the
python-socketio docs show. Its own protocol on the wire (Engine.IO v4 packets),
which the load generator speaks for it."""

from __future__ import annotations

import os
import time
from typing import Any

import socketio  # type: ignore[import-untyped]
from aiohttp import web

from ._common import parse_args, user_and_rooms

# Long ping interval: the byte-counting clients answer pings, but a ping storm
# in the middle of a ladder step is noise no other server has.
sio = socketio.AsyncServer(
    # socketio_asgi_server runs these same handlers as an ASGI app.
    async_mode=os.environ.get("BENCH_SOCKETIO_MODE", "aiohttp"),
    transports=["websocket"],
    ping_interval=300,
    ping_timeout=60,
)
USERS: dict[str, tuple[str, list[str]]] = {}


@sio.event  # type: ignore[untyped-decorator]
async def connect(sid: str, environ: dict[str, Any], auth: Any = None) -> None:
    user, rooms = user_and_rooms(environ.get("QUERY_STRING", ""))
    USERS[sid] = (user, rooms)
    for room in rooms:
        await sio.enter_room(sid, room)


@sio.event  # type: ignore[untyped-decorator]
async def disconnect(sid: str, reason: Any = None) -> None:
    USERS.pop(sid, None)


@sio.on("send")  # type: ignore[untyped-decorator]
async def send(sid: str, data: Any) -> None:
    user, rooms = USERS.get(sid, ("", []))
    room = data.get("room") if isinstance(data, dict) else None
    if room in rooms:
        await sio.emit(
            "message",
            {
                "type": "message",
                "room": room,
                "from": user,
                "text": data.get("text", ""),
                "ts": int(time.time() * 1000),
            },
            room=room,
            skip_sid=sid,
        )


def main() -> None:
    args = parse_args("socketio_server")
    app = web.Application()
    sio.attach(app)
    print(f"listening on {args.host}:{args.port}", flush=True)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
