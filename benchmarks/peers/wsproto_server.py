"""The ceiling for a Python fan-out server: wsproto, asyncio, and nothing else.

What a chat server on this stack cannot do with less work per delivery:

* each message's frame is encoded once (header and payload, by hand) and the
  same bytes object is appended to every member's queue: per recipient, one
  list append and one flag test, no call;
* each client's queue is bounded (``QUEUE_FRAMES``): a client that lets more
  pile up (its socket stays full: it stopped reading) is cut off; the bound is
  checked once per flush, not per append;
* each client with queued bytes gets one write per event-loop iteration (one
  flush, run after the reads of the iteration, see ``Writes.after_reads``),
  straight to its socket (``os.write``);
  asyncio's transport only takes what the socket would not, and while it holds
  any, the client's next writes go through it too (in order), none while it
  asks for a pause.

On the 2-core VM the benchmarks run on, a write to a loopback socket costs
6-10 us of kernel time, ten times the rest of a delivery: the server's cost
is the number of writes, and it writes once per client per iteration however
many messages the iteration carries. Below saturation that is one write per
delivery (every server that does not wait pays it); saturated, each
iteration carries what arrived during the last one.

wsproto does the handshake and parses what clients send. It speaks the peers'
protocol (see ``_common``): ``/ws?user=U&room=R``, ``{"type":"send",...}`` in,
a JSON message out to every member but the sender. No chat logic: what it
leaves out is listed in benchmarks/README.md ("The peers").
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
from collections import defaultdict

from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Ping, Request, TextMessage

from ._common import message_json, parse_args, user_and_rooms

QUEUE_FRAMES = 4096  # frames one client may have waiting (socket full) before it is cut off


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

    def schedule(self) -> None:
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self.after_reads)

    def after_reads(self) -> None:
        # asyncio runs a ``call_soon`` callback before the reads its next iteration
        # selects, so a flush scheduled straight away would write, then read what
        # arrived meanwhile, which then waits for a whole flush before its own: at
        # 1,000 clients (10 ms of writes) that doubled the latency. One more hop puts
        # the flush after those reads: what arrived during a flush goes out in the next.
        asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.scheduled = False
        dirty, self.dirty = self.dirty, []
        held = self.dirty
        for client in dirty:
            if client.paused:
                # Its transport is full: nothing written, the queue is checked here,
                # and it stays dirty (resume_writing schedules the next flush).
                if len(client.out) > QUEUE_FRAMES:
                    client.cut_off()
                else:
                    held.append(client)
                continue
            client.dirty = False
            client.write_queued()


WRITES = Writes()


class Client(asyncio.Protocol):
    def __init__(self) -> None:
        self.ws = WSConnection(ConnectionType.SERVER)
        self.transport: asyncio.Transport | None = None
        self.fd = -1
        self.user = ""
        self.rooms: list[str] = []
        self.out: list[bytes] = []
        self.dirty = False
        self.paused = False
        self.backlog = False  # the transport holds bytes the socket did not take
        self.parts: list[str] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if isinstance(transport, asyncio.Transport):
            self.transport = transport
            sock = transport.get_extra_info("socket")
            self.fd = sock.fileno() if sock is not None else -1

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
        # The hot loop: per recipient one append and one flag test.
        mark = WRITES.dirty.append
        for member in ROOMS[room]:
            if member is not self:
                member.out.append(frame)
                if not member.dirty:
                    member.dirty = True
                    mark(member)
        WRITES.schedule()

    def queue(self, data: bytes) -> None:
        self.out.append(data)
        if not self.dirty:
            self.dirty = True
            WRITES.dirty.append(self)
        WRITES.schedule()

    def write_queued(self) -> None:
        out = self.out
        transport = self.transport
        if self.paused or not out or transport is None or transport.is_closing():
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        if self.backlog:
            transport.write(data)  # after what the transport already holds
            self.backlog = transport.get_write_buffer_size() > 0
            return
        try:
            sent = os.write(self.fd, data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.cut_off()  # reset or closed: its transport's reader will see it too
            return
        if sent < len(data):
            self.backlog = True
            transport.write(data[sent:])  # asyncio waits for room and may pause us

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.out:
            if not self.dirty:
                self.dirty = True
                WRITES.dirty.append(self)
            WRITES.schedule()

    def cut_off(self) -> None:
        """It stopped reading (or its socket failed): forget it, reset the connection."""
        self.leave()
        self.out.clear()
        if self.transport is not None:
            self.transport.abort()

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
