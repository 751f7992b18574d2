"""Room broadcast with ``websockets`` (asyncio API) and its ``broadcast()``.

As the websockets docs recommend for fan-out: keep the set of connections,
call ``broadcast()`` which writes without waiting. Compression is off, as the
docs advise when CPU matters.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict

from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed

from ._common import message_json, parse_args, user_and_rooms

ROOMS: defaultdict[str, set[ServerConnection]] = defaultdict(set)


async def handler(ws: ServerConnection) -> None:
    user, rooms = user_and_rooms(ws.request.path if ws.request else "")
    for room in rooms:
        ROOMS[room].add(ws)
    try:
        async for raw in ws:
            try:
                req = json.loads(raw)
            except ValueError:
                continue
            room = req.get("room")
            if req.get("type") == "send" and room in rooms:
                frame = message_json(room, user, req.get("text", ""))
                broadcast((c for c in ROOMS[room] if c is not ws), frame)
    except ConnectionClosed:
        pass
    finally:
        for room in rooms:
            ROOMS[room].discard(ws)


async def main() -> None:
    args = parse_args("websockets_server")
    async with serve(handler, args.host, args.port, compression=None) as server:
        print(f"listening on {args.host}:{args.port}", flush=True)
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
