"""Join storm: how long 1,000 clients take to connect into one room.

Clients connect ``IN_FLIGHT`` at a time (a new one starts as soon as one is in
the room) until ``clients`` are in. A client is *in the room* once the server
has said so: for chatcore the ``members`` frame of the room (JSON mode, after
the ``welcome``) or its ``In the room:`` line (plain mode); for a peer, which
sends nothing on a join, once the handshake's 101 arrived. The clock runs from
the first connect to the last client in. Every client keeps reading all along
(a client that stopped would push back on the server), and its frames are kept:
afterwards, once the room is quiet, each JSON client's view of the room is
rebuilt from them (``members`` replaces it, ``joined``/``left`` and
``presence`` change it, in order), and every view must hold all ``clients``.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ._proc import CpuWatch, rss_kib, wait_quiet
from ._scenarios import GENERATOR_CORE, SERVER_CORE
from ._servers import RunningServer, ServerSpec
from ._wire import CHATCORE, CHATCORE_PLAIN, Flavor, FrameReader, client_frame

Log = Callable[[str], None]

CLIENTS = 1000
IN_FLIGHT = 50
ROOM = "room0"
QUIET_S = 1.5  # no bytes for this long after the last client is in: the room has settled
SETTLE_MAX_S = 20.0

_CONNECTING, _HANDSHAKE, _WAITING, _IN = range(4)


@dataclass(slots=True)
class _Client:
    user: str
    sock: socket.socket
    state: int = _CONNECTING
    head: bytes = b""
    reader: FrameReader = field(default_factory=FrameReader)
    frames: list[bytes] = field(default_factory=list)
    counted_after: int = -1  # how many frames it had when it was counted in the room


@dataclass(slots=True)
class StormResult:
    clients: int
    in_room: int
    seconds: float | None  # first connect to last client in; None when not all got in
    failures: list[str]
    views_full: int | None = None  # JSON clients whose rebuilt view holds every client
    view_min: int | None = None
    frames: int = 0
    nbytes: int = 0
    # Per client in the room, the frames it had received when it was counted: what a
    # check can read to see that no client was counted before the server said so.
    at_count: list[list[bytes]] = field(default_factory=list)


def _handshake(port: int, flavor: Flavor, user: str) -> bytes:
    lines = [
        f"GET {flavor.target(user, [ROOM])} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}",
        "Sec-WebSocket-Version: 13",
    ]
    if flavor.subprotocol:
        lines.append(f"Sec-WebSocket-Protocol: {flavor.subprotocol}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def says_in_room(kind: str, payload: bytes) -> bool:
    """Whether a server frame tells its client it is in :data:`ROOM`."""
    if kind == CHATCORE_PLAIN:
        return payload.startswith(b"In the room:")
    if kind == CHATCORE:
        if not payload.startswith(b'{"type":"members"'):
            return False
        with contextlib.suppress(ValueError):
            msg = json.loads(payload)
            return bool(msg.get("type") == "members" and msg.get("room") == ROOM)
        return False
    return True  # a peer: the 101 is all it says


def view(frames: list[bytes], room: str = ROOM) -> set[str]:
    """A JSON client's set of the room's members, rebuilt from its frames in order."""
    members: set[str] = set()
    for payload in frames:
        try:
            msg = json.loads(payload)
        except ValueError:
            continue
        if not isinstance(msg, dict) or msg.get("room") != room:
            continue
        kind = msg.get("type")
        if kind == "members":
            members = set(msg.get("users", []))
        elif kind == "joined":
            members.add(msg["user"])
        elif kind == "left":
            members.discard(msg["user"])
        elif kind == "presence":
            members |= set(msg.get("joins", []))
            members -= set(msg.get("leaves", []))
    return members


def storm(
    port: int,
    flavor: Flavor,
    *,
    clients: int = CLIENTS,
    in_flight: int = IN_FLIGHT,
    timeout: float = 60.0,
) -> tuple[StormResult, list[socket.socket]]:
    """Run the storm against a listening server; the result and the open sockets."""
    ep = select.epoll()
    live: dict[int, _Client] = {}
    users = [f"u{i}" for i in range(clients)]
    next_user = 0
    busy = 0  # clients started and not yet in the room
    in_room = 0
    failures: list[str] = []
    t0 = time.monotonic()
    deadline = t0 + timeout
    t_full: float | None = None

    def start(user: str) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = s.connect_ex(("127.0.0.1", port))
        if err not in (0, errno.EINPROGRESS):
            s.close()
            failures.append(f"{user}: connect: {os.strerror(err)}")
            return
        live[s.fileno()] = _Client(user, s)
        ep.register(s.fileno(), select.EPOLLOUT)

    def drop(c: _Client, why: str) -> None:
        nonlocal busy
        failures.append(f"{c.user}: {why}")
        with contextlib.suppress(OSError, KeyError):
            ep.unregister(c.sock.fileno())
        live.pop(c.sock.fileno(), None)
        if c.state != _IN:
            busy -= 1
        c.sock.close()

    while True:
        while busy < in_flight and next_user < clients and t_full is None:
            start(users[next_user])
            next_user += 1
            busy += 1
        now = time.monotonic()
        if t_full is None and in_room + len(failures) >= clients:
            if in_room == clients:
                t_full = now - t0
            break
        if now >= deadline:
            break
        for fd, _ in ep.poll(0.05):
            c = live.get(fd)
            if c is None:
                continue
            if c.state == _CONNECTING:
                err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    drop(c, f"connect: {os.strerror(err)}")
                    continue
                c.sock.sendall(_handshake(port, flavor, c.user))
                c.state = _HANDSHAKE
                ep.modify(fd, select.EPOLLIN)
                continue
            try:
                data = c.sock.recv(262144)
            except BlockingIOError:
                continue
            except OSError as exc:
                drop(c, f"recv: {exc}")
                continue
            if not data:
                drop(c, "closed by the server")
                continue
            if c.state == _HANDSHAKE:
                c.head += data
                if b"\r\n\r\n" not in c.head:
                    continue
                head, _, data = c.head.partition(b"\r\n\r\n")
                c.head = b""
                if not head.startswith(b"HTTP/1.1 101"):
                    drop(c, head.split(b"\r\n", 1)[0].decode("latin-1"))
                    continue
                c.state = _WAITING
            for op, payload in c.reader.feed(data):
                if op == 9:
                    with contextlib.suppress(OSError):
                        c.sock.send(client_frame(payload, opcode=10))
                elif op == 1:
                    c.frames.append(payload)
                    if c.state == _WAITING and says_in_room(flavor.kind, payload):
                        c.state = _IN
                        c.counted_after = len(c.frames)
                        busy -= 1
                        in_room += 1
            if c.state == _WAITING and flavor.kind not in (CHATCORE, CHATCORE_PLAIN):
                c.state = _IN
                c.counted_after = len(c.frames)
                busy -= 1
                in_room += 1
    # The clock has stopped: now let presence settle, still reading every client.
    settle_end = time.monotonic() + SETTLE_MAX_S
    last_rx = time.monotonic()
    while time.monotonic() - last_rx < QUIET_S and time.monotonic() < settle_end:
        for fd, _ in ep.poll(0.1):
            c = live.get(fd)
            if c is None or c.state == _CONNECTING:
                continue
            try:
                data = c.sock.recv(262144)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                drop(c, "closed by the server while settling")
                continue
            last_rx = time.monotonic()
            c.frames += [p for op, p in c.reader.feed(data) if op == 1]
    ep.close()
    joined = [c for c in live.values() if c.state == _IN]
    result = StormResult(
        clients=clients,
        in_room=in_room,
        seconds=round(t_full, 3) if t_full is not None else None,
        failures=failures[:10] + ([f"... {len(failures)} in all"] if len(failures) > 10 else []),
        frames=sum(len(c.frames) for c in joined),
        nbytes=sum(len(p) for c in joined for p in c.frames),
        at_count=[c.frames[: c.counted_after] for c in joined],
    )
    if flavor.kind == CHATCORE:
        everyone = set(users)
        views = [view(c.frames) for c in joined]
        result.views_full = sum(1 for v in views if v == everyone)
        result.view_min = min((len(v) for v in views), default=0)
    socks = [c.sock for c in live.values()]
    return result, socks


def as_dict(r: StormResult) -> dict[str, Any]:
    return {
        "clients": r.clients,
        "in_room": r.in_room,
        "seconds": r.seconds,
        "failures": r.failures,
        "views_full": r.views_full,
        "view_min": r.view_min,
        "frames_after_101": r.frames,
        "bytes_after_101": r.nbytes,
    }


def storm_run(
    spec: ServerSpec, log: Log, *, quiet_timeout: float, ours: list[int]
) -> dict[str, Any]:
    """One storm against a fresh server pinned to the server core: time, CPU, presence."""
    out: dict[str, Any] = {"server": spec.name, "scenario": "storm", "notes": []}
    quiet, share = wait_quiet(ours, timeout=quiet_timeout)
    if not quiet:
        out["notes"].append(f"machine not quiet at start: others used {share:.0%} of a core")
    server = RunningServer(spec, core=SERVER_CORE)
    socks: list[socket.socket] = []
    try:
        watch = CpuWatch({"server": server.pid, "generator": os.getpid()})
        result, socks = storm(server.port, spec.flavor)
        used = watch.stop()  # storm and settling: the server's whole cost of the joins
        out.update(as_dict(result))
        wall = used["wall"]
        out["server_cpu_s"] = round(used["server"], 3)
        out["others_share"] = round(used["others"] / wall, 3)
        out["steal_server_core"] = round(used.get(f"steal{SERVER_CORE}", 0.0) / wall, 3)
        out["steal_generator_core"] = round(used.get(f"steal{GENERATOR_CORE}", 0.0) / wall, 3)
        out["rss_kib"] = rss_kib(server.pid)
        views = (
            f", views with all {result.clients}: {result.views_full} (smallest {result.view_min})"
            if result.views_full is not None
            else ""
        )
        took = f"{result.seconds:.2f} s" if result.seconds is not None else "NOT FULL"
        log(
            f"    {spec.name:16} storm {result.in_room:,}/{result.clients:,} in the room in {took}"
            f"{views}; server cpu {used['server']:.2f} s, others {out['others_share']:.0%}, "
            f"steal {out['steal_server_core']:.0%}/{out['steal_generator_core']:.0%}"
            + (f"; failures {result.failures}" if result.failures else "")
        )
    finally:
        for s in socks:
            s.close()
        if not server.alive():
            out["notes"].append(f"server died: {server.log_tail(5)}")
        server.stop()
    return out
