"""Room broadcast with picows (Cython): one listener per connection, a set per
room, ``transport.send()`` of the same encoded bytes to every member, as the
picows examples do."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict

from picows import WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_create_server

from ._common import message_json, parse_args, user_and_rooms


class Member(WSListener):
    def __init__(self, user: str, rooms: list[str]) -> None:
        self.user = user
        self.rooms = rooms
        self.transport: WSTransport | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        for room in self.rooms:
            ROOMS[room].add(self)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.TEXT:
            try:
                req = json.loads(frame.get_payload_as_bytes())
            except ValueError:
                return
            room = req.get("room")
            if req.get("type") == "send" and room in self.rooms:
                data = message_json(room, self.user, req.get("text", "")).encode()
                for member in ROOMS[room]:
                    if member is not self and member.transport is not None:
                        member.transport.send(WSMsgType.TEXT, data)
        elif frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        for room in self.rooms:
            ROOMS[room].discard(self)


ROOMS: defaultdict[str, set[Member]] = defaultdict(set)


def listener_for(request: WSUpgradeRequest) -> Member | None:
    target = request.path.decode("latin-1")
    if not target.startswith("/ws"):
        return None
    user, rooms = user_and_rooms(target)
    return Member(user, rooms)


async def main() -> None:
    args = parse_args("picows_server")
    server = await ws_create_server(listener_for, args.host, args.port)
    print(f"listening on {args.host}:{args.port}", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
