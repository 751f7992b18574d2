"""The ceiling for a Python fan-out server: wsproto, asyncio, and nothing else.

What a chat server on this stack cannot do with less work per delivery:

* each message's frame is encoded once (header and payload, by hand) and the
  same bytes are appended to every member's queue;
* each client's queue is bounded (``QUEUE_FRAMES``): a client that lets more
  pile up (it stopped reading) is cut off;
* each client with queued bytes gets one ``transport.write`` per event-loop
  iteration (a flush scheduled with ``call_soon`` once per iteration), none
  while its transport asks for a pause.

wsproto does the handshake and parses what clients send. It speaks the peers'
protocol (see ``_common``): ``/ws?user=U&room=R``, ``{"type":"send",...}`` in,
a JSON message out to every member but the sender. No chat logic: what it
leaves out is listed in benchmarks/README.md ("The peers").
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections import defaultdict

from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Ping, Request, TextMessage

from ._common import message_json, parse_args, user_and_rooms

QUEUE_FRAMES = 4096  # frames one client may have waiting before it is cut off


def text_frame(payload: bytes) -> bytes:
    """One final, unmasked text frame (a server's): built once per message."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


class Writes:
    """The clients with queued bytes, written once per loop iteration."""

    def __init__(self) -> None:
        self.dirty: list[Client] = []
        self.scheduled = False

    def mark(self, client: Client) -> None:
        if not client.dirty:
            client.dirty = True
            self.dirty.append(client)
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.scheduled = False
        dirty, self.dirty = self.dirty, []
        for client in dirty:
            client.dirty = False
            client.write_queued()


WRITES = Writes()


class Client(asyncio.Protocol):
    def __init__(self) -> None:
        self.ws = WSConnection(ConnectionType.SERVER)
        self.transport: asyncio.Transport | None = None
        self.user = ""
        self.rooms: list[str] = []
        self.out: list[bytes] = []
        self.dirty = False
        self.paused = False
        self.parts: list[str] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport if isinstance(transport, asyncio.Transport) else None

    def data_received(self, data: bytes) -> None:
        ws = self.ws
        ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, TextMessage):
                self.parts.append(event.data)
                if event.message_finished:
                    text = "".join(self.parts)
                    self.parts.clear()
                    self.received(text)
            elif isinstance(event, Request):
                self.user, self.rooms = user_and_rooms(event.target)
                self.queue(ws.send(AcceptConnection()))
                for room in self.rooms:
                    ROOMS[room].add(self)
            elif isinstance(event, Ping):
                self.queue(ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                self.queue(ws.send(event.response()))
                self.leave()
                self.write_queued()
                if self.transport is not None:
                    self.transport.close()

    def received(self, text: str) -> None:
        try:
            req = json.loads(text)
        except ValueError:
            return
        room = req.get("room")
        if req.get("type") != "send" or room not in self.rooms:
            return
        frame = text_frame(message_json(room, self.user, req.get("text", "")).encode())
        for member in ROOMS[room]:
            if member is not self:
                member.queue(frame)

    def queue(self, data: bytes) -> None:
        out = self.out
        out.append(data)
        if len(out) > QUEUE_FRAMES:
            self.leave()
            out.clear()
            if self.transport is not None:
                self.transport.abort()  # it stopped reading: cut it off
            return
        WRITES.mark(self)

    def write_queued(self) -> None:
        transport = self.transport
        if self.paused or not self.out or transport is None or transport.is_closing():
            return
        data = self.out[0] if len(self.out) == 1 else b"".join(self.out)
        self.out.clear()
        transport.write(data)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.out:
            WRITES.mark(self)

    def leave(self) -> None:
        for room in self.rooms:
            ROOMS[room].discard(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.leave()
        self.out.clear()


ROOMS: defaultdict[str, set[Client]] = defaultdict(set)


async def main() -> None:
    args = parse_args("wsproto_server")
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Client, args.host, args.port, backlog=1024)
    print(f"listening on {args.host}:{args.port}", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
