"""The load generator's side of the wire: just enough WebSocket to be cheap.

Handshakes are blocking and batched (setup is not measured). After that every
client socket is non-blocking and read by hand: a :class:`FrameCounter` only
walks frame headers (most receivers), a :class:`FrameReader` hands out whole
payloads (probes). Client frames carry the all-zero masking key: valid RFC 6455
(the mask bit is set), and it saves the generator an XOR per byte.
"""

from __future__ import annotations

import base64
import contextlib
import os
import select
import socket
import struct
import time
from dataclasses import dataclass

CHATCORE = "chatcore"  # JSON protocol chatcore.v1 at /ws
CHATCORE_PLAIN = "chatcore-plain"  # chatcore's plain-text mode at /ws: a frame is a message
PLAIN = "plain"  # the peers' same-shaped JSON at /ws
SOCKETIO = "socketio"  # Engine.IO v4 / Socket.IO packets at /socket.io/


@dataclass(frozen=True, slots=True)
class Flavor:
    """How one server under test is spoken to."""

    kind: str

    def target(self, user: str, rooms: list[str]) -> str:
        q = "&".join([f"user={user}", *(f"room={r}" for r in rooms)])
        if self.kind == SOCKETIO:
            return f"/socket.io/?EIO=4&transport=websocket&{q}"
        return f"/ws?{q}"

    @property
    def subprotocol(self) -> str | None:
        return "chatcore.v1" if self.kind == CHATCORE else None

    def send_payload(self, room: str, text: str) -> bytes:
        if self.kind == CHATCORE_PLAIN:
            return text.encode()  # to the connect URL's (only) room
        if self.kind == SOCKETIO:
            return f'42["send",{{"room":"{room}","text":"{text}"}}]'.encode()
        return f'{{"type":"send","room":"{room}","text":"{text}"}}'.encode()

    @property
    def after_open(self) -> bytes:
        """What a client sends right after the handshake (Socket.IO's namespace connect)."""
        return client_frame(b"40") if self.kind == SOCKETIO else b""


_MASK0 = b"\0\0\0\0"


def client_frame(payload: bytes, opcode: int = 1) -> bytes:
    """One final masked frame with the zero key (payload bytes unchanged)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return head + _MASK0 + payload


CLOSE_FRAME = client_frame(struct.pack("!H", 1000), opcode=8)
SIO_PONG = client_frame(b"3")


class HandshakeFailed(Exception):
    pass


def close_all(
    opened: list[tuple[socket.socket, bytes]], first: bytes = b"", *, timeout: float = 5.0
) -> tuple[int, int]:
    """Send ``first`` and a close frame on every socket, then wait for the server to
    close each one; (how many it closed, how many were still open at ``timeout``).
    Every socket is closed on return."""
    ep = select.epoll()
    live: dict[int, socket.socket] = {}
    for sock, _ in opened:
        with contextlib.suppress(OSError):
            sock.send(first + CLOSE_FRAME)
        ep.register(sock.fileno(), select.EPOLLIN)
        live[sock.fileno()] = sock
    closed = 0
    deadline = time.monotonic() + timeout
    while live and time.monotonic() < deadline:
        for fd, _ in ep.poll(0.1):
            sock = live[fd]
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                ep.unregister(fd)
                sock.close()
                del live[fd]
                closed += 1
    for sock in live.values():
        sock.close()
    ep.close()
    return closed, len(live)


def open_many(
    port: int,
    targets: list[str],
    subprotocol: str | None,
    *,
    rcvbuf: int | None = None,
    batch: int = 50,
    timeout: float = 30.0,
) -> list[tuple[socket.socket, bytes]]:
    """Open WebSockets to 127.0.0.1:port, ``batch`` handshakes in flight at a time.

    Returns each socket (non-blocking) with the bytes that followed the 101.
    """
    out: list[tuple[socket.socket, bytes]] = []
    deadline = time.monotonic() + timeout + len(targets) * 0.05
    for start in range(0, len(targets), batch):
        group: list[socket.socket] = []
        for target in targets[start : start + batch]:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            if rcvbuf is not None:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.settimeout(max(0.1, deadline - time.monotonic()))
            s.connect(("127.0.0.1", port))
            key = base64.b64encode(os.urandom(16)).decode()
            lines = [
                f"GET {target} HTTP/1.1",
                f"Host: 127.0.0.1:{port}",
                "Upgrade: websocket",
                "Connection: Upgrade",
                f"Sec-WebSocket-Key: {key}",
                "Sec-WebSocket-Version: 13",
            ]
            if subprotocol:
                lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
            s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
            group.append(s)
        for s in group:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            buf = b""
            while b"\r\n\r\n" not in buf:
                chunk = s.recv(65536)
                if not chunk:
                    raise HandshakeFailed(f"connection closed during handshake: {buf[:200]!r}")
                buf += chunk
            head, _, rest = buf.partition(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 101"):
                raise HandshakeFailed(head.split(b"\r\n", 1)[0].decode("latin-1"))
            s.setblocking(False)
            out.append((s, rest))
    return out


def send_nowait(sock: socket.socket, data: bytes) -> bytes:
    """Write what the socket takes now; return the rest."""
    try:
        n = sock.send(data)
    except BlockingIOError:
        return data
    return data[n:]


class FrameCounter:
    """Counts text frames by walking headers only; answers pings.

    The cheap reader: per frame a few byte reads, no payload copy except for
    control frames and Socket.IO's one-byte ping packet.
    """

    __slots__ = ("frames", "nbytes", "pending", "reply", "skip", "sock", "sio")

    def __init__(self, sock: socket.socket, sio: bool) -> None:
        self.sock = sock
        self.sio = sio
        self.skip = 0  # payload bytes of the current frame still to come
        self.pending = b""  # an incomplete header (or small frame) carried over
        self.frames = 0
        self.nbytes = 0
        self.reply = b""

    def feed(self, data: bytes | bytearray, n: int = -1) -> None:
        """Walk the first ``n`` bytes of ``data`` (all of it by default).

        ``data`` may be a reused receive buffer: nothing keeps a reference to it.
        """
        if n < 0:
            n = len(data)
        self.nbytes += n
        if self.pending:
            data = self.pending + bytes(data[:n])
            n = len(data)
            self.pending = b""
        pos = self.skip
        if pos >= n:
            self.skip = pos - n
            return
        frames = 0
        while pos + 2 <= n:
            b0 = data[pos]
            ln = data[pos + 1] & 127
            hl = 2
            if ln == 126:
                if pos + 4 > n:
                    break
                ln = (data[pos + 2] << 8) | data[pos + 3]
                hl = 4
            elif ln == 127:
                if pos + 10 > n:
                    break
                ln = int.from_bytes(data[pos + 2 : pos + 10], "big")
                hl = 10
            op = b0 & 15
            if op == 1:
                if self.sio and ln == 1:
                    if pos + 3 > n:
                        break
                    if data[pos + 2] == 0x32:  # Engine.IO ping "2"
                        self.reply += SIO_PONG
                        frames -= 1
                frames += 1
            elif op >= 8:
                if pos + hl + ln > n:
                    break
                if op == 9:
                    self.reply += client_frame(bytes(data[pos + hl : pos + hl + ln]), opcode=10)
            pos += hl + ln
        self.frames += frames
        if pos > n:
            self.skip = pos - n
        else:
            self.skip = 0
            if pos < n:
                self.pending = bytes(data[pos:n])


class FrameReader:
    """Splits the byte stream into whole frames: (opcode, payload) pairs."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self.buf
        buf += data
        out: list[tuple[int, bytes]] = []
        pos = 0
        n = len(buf)
        while pos + 2 <= n:
            ln = buf[pos + 1] & 127
            hl = 2
            if ln == 126:
                if pos + 4 > n:
                    break
                ln = (buf[pos + 2] << 8) | buf[pos + 3]
                hl = 4
            elif ln == 127:
                if pos + 10 > n:
                    break
                ln = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                hl = 10
            if pos + hl + ln > n:
                break
            out.append((buf[pos] & 15, bytes(buf[pos + hl : pos + hl + ln])))
            pos += hl + ln
        del buf[:pos]
        return out
