"""A bounded soak: thousands of clients against a real ``chatcore serve`` with SQLite.

    .venv/bin/python benchmarks/soak.py [--minutes 3] [--clients 2000] [--seed 1]

It starts ``python -m chatcore_server serve`` (the code of this checkout: ``src``
and ``adapters`` go first on the server's PYTHONPATH) with a SQLite file in a
temporary directory and a short grace period, connects every client over raw
asyncio (a few dozen lines of WebSocket, ``chatcore.v1`` JSON), and lets each
client follow its own seeded random schedule: send with a client id (now and
then a burst, now and then the same id again), join and leave rooms, page
history, drop the TCP connection without a close frame and resume within the
grace period, abandon a connection and resume on a new one while the old one
is still open (a takeover), come back after the grace period (``resumed:
false``, then page the missed messages with ``history``), close with 1000 and
start afresh, and stall reading (some clients with a small receive buffer, so
that a long stall reaches the server: they may be closed 1013 or 4000, and
resume).

Every client checks, as frames arrive, that each room's offsets follow one
another without gap, duplicate or reordering, from where ``welcome`` or
``members`` said its stream starts; an ``ack`` takes its place in that stream.
At the end, with sending stopped and every send acknowledged, it checks:

* the store: every room's offsets run 1..head without a gap; every acked
  message is stored exactly once, at its acked offset, with the text sent;
  every message a client received is the stored one;
* deliveries: no gap, duplicate or reordering in any client's stream; every
  resume made within the grace period came back ``resumed: true`` with the
  offsets given, every late one ``resumed: false``, and its ``history`` pages
  covered exactly what was missed; every client ends at its rooms' heads;
* the server: RSS after every client has gone is at most RSS after the warm-up
  plus ``--rss-slack-mib`` plus ``--rss-kib-per-message`` for each message the
  rooms' in-memory windows held (up to ``Config.history_window``, 1,000, per room):
  CPython keeps the arenas of a forgotten room's window, so RSS does not fall back,
  but nothing else may grow with the run; no ``Traceback`` in its stderr; it exits
  0 on SIGTERM.

It prints a table of figures and exits 1 if any check failed. Not run in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import random
import resource
import shutil
import signal
import socket
import sqlite3
import statistics
import struct
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
WINDOW = 1000  # Config.history_window: messages per room the server keeps in memory
WORDS = [
    *("soak", "ping", "offset", "resume", "grace", "room", "ledger", "store", "epoch"),
    *("ack", "order", "once", "café", "naïve", "日本語", "ünïcödé", "ok", "yes", "later"),
]

# What a client does next, and how often (weights). Drops, stalls and quits are
# rarer than sends, as they are in real life, but each happens hundreds of times
# in the full run.
ACTIONS: dict[str, float] = {
    "send": 50,
    "burst": 4,
    "resend": 5,
    "join": 7,
    "leave": 5,
    "history": 4,
    "drop": 7,  # TCP gone without a close frame; resume within the grace period
    "abandon": 3,  # stop reading, resume on a new connection (server takes over)
    "late": 2,  # TCP gone; come back after the grace period
    "quit": 2,  # close 1000, start a new session
    "stall": 6,  # stop reading for a while
}


# -- bookkeeping -------------------------------------------------------------------------


class Findings:
    """Counters for the table, and every failed check with a few examples."""

    def __init__(self) -> None:
        self.count: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def fail(self, kind: str, detail: str) -> None:
        self.failures[kind] += 1
        examples = self.examples.setdefault(kind, [])
        if len(examples) < 5:
            examples.append(detail)


@dataclass(slots=True)
class Seen:
    """A message as the first client to receive it saw it."""

    epoch: str
    sender: str
    cid: str | None
    text: str


class Ledger:
    """What the clients learnt, for the checks against the store at the end."""

    def __init__(self, findings: Findings) -> None:
        self.findings = findings
        self.seen: dict[tuple[str, int], Seen] = {}
        # (room, sender, client id) -> (offset, text), one entry per acked send.
        self.acked: dict[tuple[str, str, str], tuple[int, str]] = {}

    def see(self, who: str, message: dict[str, Any]) -> None:
        key = (message["room"], message["offset"])
        got = Seen(message["epoch"], message["from"], message.get("id"), message["text"])
        first = self.seen.setdefault(key, got)
        if first != got:
            self.findings.fail(
                "same offset, different message",
                f"{who} {key}: {got.sender} {got.cid} != first seen {first.sender} {first.cid}",
            )


@dataclass(slots=True)
class Track:
    """One client's stream of one room: where it started, the last offset seen."""

    start: int
    last: int


@dataclass(slots=True)
class Page:
    """A ``history`` request: messages ``lo < offset < before`` are expected, in order."""

    room: str
    lo: int
    before: int
    fill: bool  # paging what was missed after a resume past the grace period


# -- the wire ----------------------------------------------------------------------------


def frame(payload: bytes, opcode: int = 1) -> bytes:
    """A client frame: final, masked with the all-zero key (valid, and no XOR to do)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return head + b"\0\0\0\0" + payload


class Link(asyncio.Protocol):
    """One WebSocket connection of a client: handshake, frames, pings, close."""

    def __init__(self, client: Client, target: str) -> None:
        self.client = client
        self.target = target
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.status: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.gone = asyncio.Event()
        self.retired = False  # frames and loss no longer concern the client
        self.close_code: int | None = None
        self.closing = False
        self.parts: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(
            (
                f"GET {self.target} HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: chatcore.v1\r\n\r\n"
            ).encode()
        )

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.status.done():
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).split(b" ", 2)
            del self.buf[: end + 4]
            code = int(head[1]) if len(head) > 1 and head[1].isdigit() else 0
            self.status.set_result(code)
            if code != 101:
                self.abort()
                return
        self._frames()

    def _frames(self) -> None:
        buf = self.buf
        pos = 0
        n = len(buf)
        while pos + 2 <= n:
            b0, ln = buf[pos], buf[pos + 1] & 127
            hl = 2
            if ln == 126:
                if pos + 4 > n:
                    break
                ln, hl = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif ln == 127:
                if pos + 10 > n:
                    break
                ln, hl = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            if pos + hl + ln > n:
                break
            payload = bytes(buf[pos + hl : pos + hl + ln])
            pos += hl + ln
            self._frame(b0 & 0x80 != 0, b0 & 15, payload)
        del buf[:pos]

    def _frame(self, fin: bool, opcode: int, payload: bytes) -> None:
        if opcode in (0, 1):
            self.parts.append(payload)
            if fin:
                text, self.parts = b"".join(self.parts), []
                if not self.retired and not self.closing:
                    self.client.on_frame(self, json.loads(text))
        elif opcode == 9:
            self.write(frame(payload, 10))
        elif opcode == 8:
            self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            if not self.retired:
                self.client.on_close_frame(self, self.close_code, payload[2:].decode())
            if not self.closing:
                self.closing = True
                self.write(frame(payload[:2], 8))
            if self.transport is not None:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.status.done():
            self.status.set_result(0)
        self.gone.set()
        if not self.retired:
            self.client.on_lost(self)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def send(self, obj: dict[str, Any]) -> None:
        self.write(frame(json.dumps(obj).encode()))

    def abort(self) -> None:
        """Drop the TCP connection: no close frame, unsent data thrown away."""
        if self.transport is not None:
            self.transport.abort()

    def pause(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    async def close(self, timeout: float) -> None:
        """Close with 1000 and wait for the server to close the TCP connection."""
        if not self.closing:
            self.closing = True
            self.write(frame(struct.pack("!H", 1000), 8))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.gone.wait(), timeout)
        self.abort()


# -- one client --------------------------------------------------------------------------


class Client:
    """A user's browser tab, on a seeded schedule, checking everything it receives."""

    def __init__(self, soak: Soak, idx: int) -> None:
        self.soak = soak
        self.f = soak.findings
        self.idx = idx
        self.user = f"u{idx // soak.args.per_user}"
        self.name = f"c{idx}/{self.user}"
        self.rng = random.Random(f"{soak.args.seed}:{idx}")
        self.slow = self.rng.random() < 0.1  # a small receive buffer: stalls reach the server
        self.link: Link | None = None
        self.token: str | None = None
        self.tracks: dict[str, Track] = {}
        self.joining: set[str] = set()
        self.leaving: set[str] = set()
        self.unacked: dict[str, tuple[str, str, float]] = {}  # cid -> room, text, sent at
        self.acked: dict[str, tuple[str, int, str]] = {}  # cid -> room, offset, text
        self.resends: dict[str, float] = {}  # acked cid sent again, awaiting its ack
        self.pages: deque[Page] = deque()
        self.page: Page | None = None
        self.members_due: dict[str, int] = {}
        self.seq = 0
        self.expect: bool | None = None  # resumed:true/false expected from the next welcome
        self.dropped_at = 0.0
        self.welcomed = asyncio.Event()
        self.lost = asyncio.Event()

    # -- frames in --

    def on_frame(self, link: Link, f: dict[str, Any]) -> None:
        if link is not self.link:
            return
        kind = f.get("type")
        if kind == "message":
            self._message(f)
        elif kind == "ack":
            self._ack(f)
        elif kind == "welcome":
            self._welcome(f)
        elif kind == "members":
            self._members(f)
        elif kind == "left":
            if f["user"] == self.user:
                self._left(f["room"])
        elif kind == "history":
            self._history(f)
        elif kind == "error":
            self._error(f)

    def on_close_frame(self, link: Link, code: int, reason: str) -> None:
        self.f.count[f"closed by server {code} {reason}"] += 1

    def on_lost(self, link: Link) -> None:
        if link is self.link:
            self.lost.set()

    def _message(self, f: dict[str, Any]) -> None:
        self.soak.ledger.see(self.name, f)
        self.f.count["messages received"] += 1
        room, n = f["room"], f["offset"]
        t = self.tracks.get(room)
        if t is None:
            self.f.fail("message of a room not joined", f"{self.name} {room}@{n}")
        elif n == t.last + 1:
            t.last = n
        elif n <= t.last:
            self.f.fail("duplicate or reordered delivery", f"{self.name} {room}@{n} after {t.last}")
        else:
            self.f.fail("gap in delivery", f"{self.name} {room}: {t.last} then {n}")
            t.last = n

    def _ack(self, f: dict[str, Any]) -> None:
        cid, room, n = f["id"], f["room"], f["offset"]
        if cid in self.acked:
            was = self.acked[cid][:2]
            if was != (room, n):
                self.f.fail("a repeated client id acked elsewhere", f"{self.name} {cid}: {was}")
            if self.resends.pop(cid, None) is not None:
                self.f.count["repeated ids acked at their first offset"] += 1
            return
        pending = self.unacked.pop(cid, None)
        if pending is None:
            self.f.fail("ack for nothing sent", f"{self.name} {cid} {room}@{n}")
            return
        text = pending[1]
        self.acked[cid] = (room, n, text)
        self.soak.ledger.acked[(room, self.user, cid)] = (n, text)
        self.f.count["sends acked"] += 1
        t = self.tracks.get(room)
        if t is None:
            self.f.fail("ack for a room not joined", f"{self.name} {cid} {room}@{n}")
        elif n == t.last + 1:
            t.last = n
        elif n > t.last:
            self.f.fail("ack ahead of the stream", f"{self.name} {room}: {t.last} then ack {n}")
            t.last = n
        else:
            # Stored before a drop: replayed to us as a message, or before this stream began.
            self.f.count["retried sends acked at an earlier offset"] += 1
            seen = self.soak.ledger.seen.get((room, n))
            if n > t.start and (seen is None or (seen.sender, seen.cid) != (self.user, cid)):
                holder = seen and (seen.sender, seen.cid)
                self.f.fail("ack names another message", f"{self.name} {cid} {room}@{n}: {holder}")

    def _welcome(self, f: dict[str, Any]) -> None:
        rooms: dict[str, dict[str, Any]] = f["rooms"]
        resumed = bool(f["resumed"])
        self.token = f["resume"]
        if self.expect is not None:
            # The server's grace period starts when it sees the drop, never before ours:
            # a welcome read less than the grace period after our drop must resume.
            elapsed = time.monotonic() - self.dropped_at
            if self.expect and elapsed >= self.soak.args.grace:
                self.f.count["resumes meant within grace, late (this process lagged)"] += 1
            elif resumed != self.expect:
                kind = "resume within grace refused" if self.expect else "resumed after grace"
                self.f.fail(kind, f"{self.name}: welcome {elapsed:.1f} s after the drop")
            else:
                self.f.count[f"resumes {'within' if self.expect else 'after'} grace"] += 1
        self.f.count[f"welcome resumed:{str(resumed).lower()}"] += 1
        if resumed:
            for room, t in list(self.tracks.items()):
                if room in rooms:
                    start = rooms[room]["offset"]
                    if start != t.last:
                        self.f.fail(
                            "resume starts elsewhere", f"{self.name} {room}: {t.last} -> {start}"
                        )
                        t.last = start
                    self.leaving.discard(room)  # the leave never reached the server
                else:
                    if room not in self.leaving:
                        self.f.fail("room lost on resume", f"{self.name} {room}")
                    del self.tracks[room]
            self.leaving.clear()
        else:
            for room, t in self.tracks.items():
                if room in rooms and room not in self.leaving:
                    new_start = rooms[room]["offset"]
                    if new_start > t.last:
                        self.pages.append(Page(room, t.last, new_start + 1, fill=True))
            self.tracks.clear()
            self.leaving.clear()
        for room, pos in rooms.items():
            if room not in self.tracks:
                if room not in self.joining and resumed:
                    self.f.fail("unexpected room in welcome", f"{self.name} {room}")
                self.tracks[room] = Track(pos["offset"], pos["offset"])
            self.members_due[room] = pos["offset"]
        wanted = {r for r in self.joining if r not in rooms}
        if wanted:
            self.f.fail("joined rooms missing from welcome", f"{self.name} {sorted(wanted)}")
        self.joining.clear()
        self.expect = None
        self.welcomed.set()

    def _members(self, f: dict[str, Any]) -> None:
        room, n = f["room"], f["offset"]
        due = self.members_due.pop(room, None)
        if due is not None:
            if n != due:
                self.f.fail("members offset differs from welcome", f"{self.name} {room}")
        elif room in self.joining:
            self.joining.discard(room)
            self.tracks[room] = Track(n, n)
            self.f.count["joins"] += 1
        else:
            self.f.fail("members for a room not asked", f"{self.name} {room}")

    def _left(self, room: str) -> None:
        if room in self.leaving:
            self.leaving.discard(room)
            del self.tracks[room]
            self.f.count["leaves"] += 1
        else:
            self.f.count["own name left, not our leave"] += 1

    def _history(self, f: dict[str, Any]) -> None:
        page = self.page
        if page is None or page.room != f["room"]:
            self.f.count["history answers nobody waits for"] += 1
            return
        self.page = None
        offsets = [m["offset"] for m in f["messages"]]
        for m in f["messages"]:
            self.soak.ledger.see(self.name, m)
        want_first = max(page.lo + 1, page.before - self.soak.page_limit)
        want = list(range(want_first, page.before))
        if offsets != want:
            self.f.fail(
                "history page wrong",
                f"{self.name} {page.room} ({page.lo},{page.before}): {offsets[:3]}..{offsets[-3:]}",
            )
            return
        self.f.count["history messages"] += len(offsets)
        if page.fill:
            self.f.count["missed messages paged after a late resume"] += len(offsets)
            if want_first > page.lo + 1:
                self.pages.appendleft(Page(page.room, page.lo, want_first, fill=True))
        self._next_page()

    def _error(self, f: dict[str, Any]) -> None:
        code, ref = f.get("code"), f.get("ref")
        self.f.count[f"error {code}"] += 1
        if code in ("rate_limited", "unavailable") and ref in self.unacked:
            room, text, _ = self.unacked[ref]
            delay = float(f.get("retry_after") or 0.5)
            asyncio.get_running_loop().call_later(delay, self._send_frame, ref, room, text)
        elif code == "rate_limited" and ref in self.resends:
            del self.resends[ref]
        elif code == "rate_limited" and self.page is not None:
            page, self.page = self.page, None
            self.pages.appendleft(page)
            asyncio.get_running_loop().call_later(1.0, self._next_page)
        else:
            self.f.fail(f"error {code}", f"{self.name} {f}")

    # -- requests out --

    def _send_frame(self, cid: str, room: str, text: str) -> None:
        if self.link is not None and cid in self.unacked and self.welcomed.is_set():
            self.link.send({"type": "send", "room": room, "text": text, "id": cid})

    def send(self, room: str) -> None:
        self.seq += 1
        cid = f"{self.idx}.{self.seq}"
        words = self.rng.choices(WORDS, k=self.rng.randint(3, 60))
        text = f"{cid} " + " ".join(words)
        self.unacked[cid] = (room, text, time.monotonic())
        self.f.count["sends"] += 1
        self._send_frame(cid, room, text)

    def _next_page(self) -> None:
        if self.page is None and self.pages and self.link is not None:
            page = self.page = self.pages.popleft()
            limit = min(self.soak.page_limit, page.before - page.lo - 1)
            self.link.send(
                {"type": "history", "room": page.room, "before": page.before, "limit": limit}
            )

    def settled(self) -> bool:
        return not (
            self.unacked or self.joining or self.leaving or self.resends or self.pages or self.page
        )

    def live_rooms(self) -> list[str]:
        return sorted(r for r in self.tracks if r not in self.leaving)

    # -- connecting --

    async def connect(self, *, resume: bool, expect: bool | None) -> None:
        """Open a connection and wait for its welcome; retry until one comes."""
        soak = self.soak
        while not soak.aborted:
            rooms = self.live_rooms() + sorted(self.joining - set(self.tracks))
            query: list[tuple[str, str]] = [("user", self.user)] + [("room", r) for r in rooms]
            if resume and self.token is not None:
                query.append(("resume", self.token))
                query += [("offset", f"{r}:{t.last}") for r, t in sorted(self.tracks.items())]
            self.expect = expect if resume else None
            self.welcomed.clear()
            self.lost.clear()
            if self.page is not None:  # its answer went with the old connection
                self.pages.appendleft(self.page)
                self.page = None
            self.members_due.clear()
            if await self._open(f"/ws?{urlencode(query)}") is None:
                await asyncio.sleep(0.5 + self.rng.random())
                continue
            lost = asyncio.ensure_future(self.lost.wait())
            welcomed = asyncio.ensure_future(self.welcomed.wait())
            await asyncio.wait((lost, welcomed), timeout=30, return_when=asyncio.FIRST_COMPLETED)
            lost.cancel()
            welcomed.cancel()
            if self.welcomed.is_set():
                self.resends.clear()
                for cid, (room, text, _) in list(self.unacked.items()):
                    self.f.count["sends retried after reconnecting"] += 1
                    self._send_frame(cid, room, text)
                self._next_page()
                return
            self.f.count["connections lost before welcome"] += 1
            self._retire()
            await asyncio.sleep(0.5 + self.rng.random())
            resume = True
            expect = None

    async def _open(self, target: str) -> Link | None:
        loop = asyncio.get_running_loop()
        async with self.soak.opening:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            if self.slow:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
            sock.setblocking(False)
            try:
                await asyncio.wait_for(loop.sock_connect(sock, (HOST, self.soak.port)), 10)
                _, link = await loop.create_connection(lambda: Link(self, target), sock=sock)
                # The welcome may come in the same read as the 101: the link is ours already.
                self.link = link
                status = await asyncio.wait_for(link.status, 30)
            except (OSError, TimeoutError) as exc:
                self._retire()
                sock.close()
                self.f.count[f"connect failed: {type(exc).__name__}"] += 1
                return None
        self.f.count["connections opened"] += 1
        if status != 101:
            what = f"refused {status}" if status else "closed before the 101"
            self.f.count[f"handshakes {what}"] += 1
            self._retire()
            link.abort()
            return None
        return link

    def _retire(self) -> Link | None:
        link, self.link = self.link, None
        if link is not None:
            link.retired = True
        return link

    # -- the schedule --

    async def run(self) -> None:
        soak = self.soak
        rooms = self.rng.sample(soak.rooms, self.rng.randint(1, 2))
        self.joining.update(rooms)
        await self.connect(resume=False, expect=None)
        soak.ready += 1
        await soak.started.wait()
        names = list(ACTIONS)
        weights = list(ACTIONS.values())
        while not soak.stopping.is_set() and not soak.aborted:
            stop = asyncio.ensure_future(soak.stopping.wait())
            lost = asyncio.ensure_future(self.lost.wait())
            delay = self.rng.expovariate(1 / soak.args.think)
            await asyncio.wait((stop, lost), timeout=delay, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            lost.cancel()
            if soak.aborted or soak.stopping.is_set():
                break
            if self.lost.is_set():
                self.f.count["connections lost (server's doing)"] += 1
                self._retire()
                await asyncio.sleep(self.rng.uniform(0.1, 1.0))
                await self.connect(resume=True, expect=None)
                continue
            action = self.rng.choices(names, weights)[0]
            await getattr(self, f"do_{action}")()
        await self.finish()

    def _room(self) -> str | None:
        rooms = self.live_rooms()
        return self.rng.choice(rooms) if rooms else None

    async def do_send(self) -> None:
        room = self._room()
        if room is not None:
            self.send(room)

    async def do_burst(self) -> None:
        room = self._room()
        if room is not None:
            for _ in range(5):
                self.send(room)

    async def do_resend(self) -> None:
        live = set(self.live_rooms())
        done = [cid for cid, (room, _, _) in self.acked.items() if room in live]
        if done and self.link is not None:
            cid = self.rng.choice(done)
            room, _, text = self.acked[cid]
            self.resends[cid] = time.monotonic()
            self.f.count["client ids sent again"] += 1
            self.link.send({"type": "send", "room": room, "text": text, "id": cid})

    async def do_join(self) -> None:
        if len(self.tracks) + len(self.joining) < 3 and self.link is not None:
            room = self.rng.choice([r for r in self.soak.rooms if r not in self.tracks])
            if room not in self.joining:
                self.joining.add(room)
                self.link.send({"type": "join", "room": room})

    async def do_leave(self) -> None:
        busy = {room for room, _, _ in self.unacked.values()}
        busy |= {self.acked[cid][0] for cid in self.resends}
        busy |= {p.room for p in self.pages} | ({self.page.room} if self.page else set())
        rooms = [r for r in self.live_rooms() if r not in busy]
        if len(self.live_rooms()) > 1 and rooms and self.link is not None:
            room = self.rng.choice(rooms)
            self.leaving.add(room)
            self.link.send({"type": "leave", "room": room})

    async def do_history(self) -> None:
        room = self._room()
        if room is not None and self.tracks[room].last > 0:
            last = self.tracks[room].last
            self.pages.append(Page(room, max(0, last - 30), last + 1, fill=False))
            self._next_page()

    def _quiet(self) -> bool:
        """Nothing asked and unanswered whose answer could fall into the gap."""
        return not (self.joining or self.leaving or self.page or self.resends)

    def _send_last_words(self) -> None:
        """Half the time, send just before the connection goes: its ack may be lost."""
        room = self._room()
        if room is not None and self.rng.random() < 0.5:
            self.send(room)
            self.f.count["sends just before a drop"] += 1

    def _cut(self) -> None:
        """Drop the TCP connection without a close frame."""
        self._send_last_words()
        link = self._retire()
        if link is not None:
            link.abort()
        self.dropped_at = time.monotonic()

    async def do_drop(self) -> None:
        if not self._quiet():
            return
        self._cut()
        self.f.count["drops (resume within grace)"] += 1
        await asyncio.sleep(self.rng.uniform(0.2, 3.0))
        await self.connect(resume=True, expect=True)

    async def do_abandon(self) -> None:
        if not self._quiet():
            return
        self._send_last_words()
        old = self._retire()
        self.dropped_at = time.monotonic()
        if old is not None:
            old.pause()
        self.f.count["abandoned connections (takeover)"] += 1
        await self.connect(resume=True, expect=True)
        if old is not None:
            await asyncio.sleep(self.rng.uniform(0.5, 3.0))
            old.abort()

    async def do_late(self) -> None:
        if not self._quiet():
            return
        self._cut()
        self.f.count["drops (resume after grace)"] += 1
        await asyncio.sleep(self.soak.args.grace + self.rng.uniform(3.0, 6.0))
        await self.connect(resume=True, expect=False)

    async def do_quit(self) -> None:
        if not self._quiet() or self.unacked or self.pages:
            return
        link = self._retire()
        if link is not None:
            await link.close(5)
        self.f.count["quits (close 1000, new session)"] += 1
        self.tracks.clear()
        self.token = None
        await asyncio.sleep(self.rng.uniform(0.5, 3.0))
        self.joining.update(self.rng.sample(self.soak.rooms, self.rng.randint(1, 2)))
        await self.connect(resume=False, expect=None)

    async def do_stall(self) -> None:
        link = self.link
        if link is None:
            return
        long = self.slow and self.rng.random() < 0.4
        seconds = self.rng.uniform(40.0, 60.0) if long else self.rng.uniform(1.0, 8.0)
        self.f.count["long stalls (small receive buffer)" if long else "short stalls"] += 1
        link.pause()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.soak.stopping.wait(), seconds)
        link.resume()

    def caught_up(self) -> bool:
        heads = self.soak.heads
        return all(t.last == heads.get(room, 0) for room, t in self.tracks.items())

    async def settle(self, done: Callable[[], bool], timeout: float) -> bool:
        """Stay connected (resuming when the server drops us) until ``done()``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.soak.aborted:
            if self.link is None or self.lost.is_set():
                self._retire()
                await self.connect(resume=True, expect=None)
                continue
            if done():
                return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.lost.wait(), 0.2)
        return False

    async def finish(self) -> None:
        """After the schedule: every request answered, then every room read to its head."""
        if not await self.settle(self.settled, 90.0):
            now = time.monotonic()
            ages = {cid: round(now - at) for cid, (_, _, at) in self.unacked.items()}
            self.f.fail(
                "client did not settle",
                f"{self.name} unacked (age s)={dict(list(ages.items())[:3])} "
                f"joining={self.joining} leaving={self.leaving} resends={list(self.resends)[:3]} "
                f"page={self.page} pages={len(self.pages)}",
            )
        self.soak.settled += 1
        await self.soak.heads_known.wait()
        if not await self.settle(self.caught_up, 30.0):
            heads = self.soak.heads
            self.f.fail(
                "client did not reach its rooms' heads",
                f"{self.name} "
                + " ".join(f"{r}@{t.last}/{heads.get(r, 0)}" for r, t in self.tracks.items()),
            )


# -- the server --------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    """``chatcore serve`` in a subprocess, its stderr in a file, its RSS sampled."""

    def __init__(self, db: Path, grace: float, stderr: Path) -> None:
        self.db = db
        self.grace = grace
        self.stderr_path = stderr
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0
        self.samples: list[tuple[float, int]] = []

    async def start(self) -> None:
        env = dict(os.environ)
        path = [str(ROOT / "src"), str(ROOT / "adapters")]
        if env.get("PYTHONPATH"):
            path.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(path)
        with open(self.stderr_path, "wb") as err:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "chatcore_server", "serve", "--port", "0",
                "--db", f"sqlite:///{self.db}", "--grace", str(self.grace),
                "--log-level", "warning",
                stdout=asyncio.subprocess.PIPE, stderr=err, env=env,
            )  # fmt: skip
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 30)
        # "chatcore is running: open http://127.0.0.1:PORT/ in a browser"
        url = line.decode().split("open ", 1)[1].split()[0]
        self.port = int(url.rstrip("/").rsplit(":", 1)[1])

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss(self) -> int:
        kib = rss_kib(self.pid)
        self.samples.append((time.monotonic(), kib))
        return kib

    async def sample_forever(self) -> None:
        while True:
            self.rss()
            await asyncio.sleep(1.0)

    async def stop(self) -> int | None:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 20)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
                return None
        return self.proc.returncode


async def http_history(port: int, room: str) -> dict[str, Any]:
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(
        f"GET /rooms/{room}/messages?limit=100 HTTP/1.1\r\nHost: {HOST}\r\n"
        "Connection: close\r\n\r\n".encode()
    )
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    body = data.split(b"\r\n\r\n", 1)[1]
    result: dict[str, Any] = json.loads(body)
    return result


# -- the run -----------------------------------------------------------------------------


class Soak:
    def __init__(self, args: argparse.Namespace, port: int) -> None:
        self.args = args
        self.port = port
        self.findings = Findings()
        self.ledger = Ledger(self.findings)
        self.rooms = [f"soak-{i:02d}" for i in range(args.rooms)]
        self.opening = asyncio.Semaphore(64)
        self.started = asyncio.Event()
        self.stopping = asyncio.Event()
        self.aborted = False
        self.ready = 0
        self.settled = 0
        self.heads: dict[str, int] = {}
        self.heads_known = asyncio.Event()
        self.page_limit = 100
        self.clients = [Client(self, i) for i in range(args.clients)]


async def loop_lag(samples: list[float], stalls: list[tuple[float, float]]) -> None:
    """How late this process's event loop runs a 0.1 s timer; for stalls over 1 s, also
    the CPU it used meanwhile (near the stall: busy; near zero: the machine starved it)."""
    while True:
        t, cpu = time.monotonic(), time.process_time()
        await asyncio.sleep(0.1)
        lag = time.monotonic() - t - 0.1
        samples.append(lag)
        if lag > 1.0:
            stalls.append((lag, time.process_time() - cpu))


def store_rows(db: Path) -> tuple[dict[str, tuple[str, int]], list[tuple[Any, ...]]]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
        rooms = {
            name: (epoch, head)
            for name, epoch, head in con.execute("SELECT name, epoch, head FROM rooms")
        }
        rows = con.execute(
            "SELECT room, msg_offset, epoch, sender, text, client_id FROM messages"
            " ORDER BY room, epoch, msg_offset"
        ).fetchall()
    return rooms, rows


def check_store(soak: Soak, db: Path) -> dict[str, int]:
    """Every room gap-free, every acked message once at its offset, every delivery stored."""
    f = soak.findings
    rooms, rows = store_rows(db)
    by_key: dict[tuple[str, int], tuple[Any, ...]] = {}
    offsets: dict[tuple[str, str], list[int]] = {}
    keys: Counter[tuple[str, str, str]] = Counter()
    for room, offset, epoch, sender, text, cid in rows:
        by_key[(room, offset)] = (epoch, sender, text, cid)
        offsets.setdefault((room, epoch), []).append(offset)
        if cid is not None:
            keys[(room, sender, cid)] += 1
    for (room, epoch), got in offsets.items():
        if got != list(range(1, len(got) + 1)):
            f.fail("stored offsets not gap-free", f"{room} epoch {epoch}: {len(got)} rows")
        if rooms.get(room) != (epoch, len(got)):
            f.fail("room head differs from its messages", f"{room}: {rooms.get(room)}")
    for key, n in keys.items():
        if n != 1:
            f.fail("client id stored more than once", f"{key} x{n}")
    for (room, sender, cid), (offset, text) in soak.ledger.acked.items():
        row = by_key.get((room, offset))
        if row is None or row[1:] != (sender, text, cid):
            stored = row and (row[1], row[3], row[2][:20])
            f.fail("acked message not stored as acked", f"{room}@{offset} {sender} {cid}: {stored}")
    for (room, offset), seen in soak.ledger.seen.items():
        row = by_key.get((room, offset))
        if row is None or row != (seen.epoch, seen.sender, seen.text, seen.cid):
            f.fail("delivered message differs from the store", f"{room}@{offset}")
    acked_keys = set(soak.ledger.acked)
    never_acked = sum(1 for k in keys if k not in acked_keys)
    if never_acked:
        f.fail("stored messages nobody got an ack for", f"{never_acked} rows")
    return {"rooms": len(rooms), "messages stored": len(rows)}


async def run(args: argparse.Namespace, tmp: Path) -> int:
    db = tmp / "soak.db"
    server = Server(db, args.grace, tmp / "server.stderr")
    await server.start()
    soak = Soak(args, server.port)
    f = soak.findings
    lags: list[float] = []
    stalls: list[tuple[float, float]] = []
    background = [
        asyncio.ensure_future(server.sample_forever()),
        asyncio.ensure_future(loop_lag(lags, stalls)),
    ]
    t0 = time.monotonic()
    cpu0 = time.process_time()
    print(
        f"soak: server pid {server.pid} on port {server.port}, db {db}; "
        f"{args.clients} clients, {args.minutes} min, seed {args.seed}",
        flush=True,
    )
    tasks = [asyncio.ensure_future(c.run()) for c in soak.clients]

    def server_dead() -> bool:
        return server.proc is not None and server.proc.returncode is not None

    async def wait_for(condition: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not condition():
            if server_dead():
                soak.aborted = True
                f.fail(
                    "server exited during the run", f"exit {server.proc and server.proc.returncode}"
                )
                return False
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.2)
        return True

    if not await wait_for(lambda: soak.ready == args.clients, 60 + args.clients / 20):
        f.fail("warm-up: not every client welcomed", f"{soak.ready}/{args.clients}")
    warm = time.monotonic() - t0
    await asyncio.sleep(3)
    rss_start = server.rss()
    cpu_server0 = cpu_seconds(server.pid)
    print(
        f"soak: {soak.ready} clients welcomed in {warm:.1f} s; RSS {rss_start / 1024:.1f} MiB",
        flush=True,
    )
    soak.started.set()
    end = time.monotonic() + args.minutes * 60
    while time.monotonic() < end and not soak.aborted:
        await wait_for(lambda: soak.aborted, min(15.0, end - time.monotonic()))
        if soak.aborted:
            break
        left = end - time.monotonic()
        print(
            f"soak: {max(0, left):5.0f} s left, RSS {rss_kib(server.pid) / 1024:.1f} MiB, "
            f"acked {f.count['sends acked']}, received {f.count['messages received']}, "
            f"failures {sum(f.failures.values())}",
            flush=True,
        )
    soak.stopping.set()
    t_stop = time.monotonic()
    await wait_for(lambda: soak.settled == args.clients, 120)
    settle_s = time.monotonic() - t_stop
    figures: dict[str, Any] = {}
    if not server_dead():
        # Every send is acked, so the store holds the final heads: every client must reach them.
        soak.heads = {name: head for name, (_, head) in store_rows(db)[0].items()}
    soak.heads_known.set()
    done, pending = await asyncio.wait(tasks, timeout=60)
    for task in pending:
        task.cancel()
        f.fail("client stuck at the end", "")
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            f.fail("client crashed", repr(task.exception()))
    if not server_dead():
        for room in soak.rooms:
            page = await http_history(server.port, room)
            for m in page.get("messages", []):
                soak.ledger.see(f"HTTP {room}", m)
            f.count["messages read over HTTP"] += len(page.get("messages", []))
        # Everyone leaves, cleanly.
        links = [link for c in soak.clients if (link := c._retire()) is not None]
        await asyncio.gather(*(link.close(10) for link in links))
        await asyncio.sleep(5.0)  # the server ends each session at once on a 1000 close
        rss_end = server.rss()
        figures["server CPU s (run)"] = round(cpu_seconds(server.pid) - cpu_server0, 1)
    else:
        rss_end = 0
    for task in background:
        task.cancel()
    rss_peak = max(k for _, k in server.samples)
    code = await server.stop()
    client_cpu = time.process_time() - cpu0
    if code != 0:
        f.fail("server did not exit 0 on SIGTERM", f"exit {code}")
    mib = 1 / 1024
    log = server.stderr_path.read_text(errors="replace")
    tracebacks = log.count("Traceback")
    if tracebacks:
        f.fail("Traceback in server stderr", f"{tracebacks} (see {server.stderr_path})")
    errors = [line for line in log.splitlines() if " ERROR " in line or " CRITICAL " in line]
    figures.update(check_store(soak, db))
    windows = sum(min(head, WINDOW) for head in soak.heads.values())
    bound = round(args.rss_slack_mib * 1024 + args.rss_kib_per_message * windows)
    if rss_end > rss_start + bound:
        f.fail("server RSS did not come back", f"{rss_start} -> {rss_end} KiB (bound +{bound})")

    # -- the report --
    figures |= {
        "clients / users / rooms": (
            f"{args.clients} / {-(-args.clients // args.per_user)} / {args.rooms}"
        ),
        "minutes, seed, grace s, think s": (
            f"{args.minutes}, {args.seed}, {args.grace}, {args.think}"
        ),
        "warm-up s (all welcomed)": round(warm, 1),
        "settle s (all sends acked)": round(settle_s, 1),
        "server RSS start / peak / end MiB": (
            f"{rss_start * mib:.1f} / {rss_peak * mib:.1f} / {rss_end * mib:.1f}"
            f" (bound: end <= start + {bound * mib:.1f} MiB: {args.rss_slack_mib:g} MiB"
            f" + {args.rss_kib_per_message:g} KiB x {windows:,} messages in the windows)"
        ),
        "client process CPU s": round(client_cpu, 1),
        "client loop lag p99 / max ms": (
            f"{statistics.quantiles(lags, n=100)[98] * 1000:.0f} / {max(lags) * 1000:.0f}"
            if len(lags) > 2
            else "-"
        ),
        "client loop stalls > 1 s: count / seconds / CPU s in them": (
            f"{len(stalls)} / {sum(t for t, _ in stalls):.1f} / {sum(c for _, c in stalls):.1f}"
        ),
        "server log: Traceback / ERROR lines": f"{tracebacks} / {len(errors)}",
    }
    print()
    print("| figure | value |")
    print("|---|---:|")
    for name, value in figures.items():
        print(f"| {name} | {value} |")
    for name, value in sorted(f.count.items()):
        print(f"| {name} | {value:,} |")
    print()
    if errors:
        print("server ERROR lines (first 5):")
        for line in errors[:5]:
            print("  " + line)
    if f.failures:
        print("FAILED checks:")
        for kind, n in f.failures.most_common():
            print(f"  {kind}: {n}")
            for example in f.examples.get(kind, []):
                print(f"      {example}")
        print(f"server log: {server.stderr_path}")
        return 1
    print(
        "PASS: every acked message stored once with gap-free offsets; every stream gap-free, "
        "in order, once; in-grace resumes resumed, late ones paged; RSS within bound; no Traceback"
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/soak.py", description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rooms", type=int, default=20)
    parser.add_argument(
        "--per-user", type=int, default=4, help="clients sharing a user name (<=16)"
    )
    parser.add_argument("--grace", type=float, default=8.0, help="the server's grace period, s")
    parser.add_argument(
        "--think", type=float, default=20.0, help="mean s between a client's actions"
    )
    parser.add_argument(
        "--rss-slack-mib", type=float, default=8.0, help="RSS growth allowed whatever the run"
    )
    parser.add_argument(
        "--rss-kib-per-message",
        type=float,
        default=2.0,
        help="RSS growth allowed per message held in the rooms' in-memory windows",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    if not 1 <= args.per_user <= 16:
        parser.error("--per-user must be 1..16 (the server allows 16 sessions per user)")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    tmp = Path(tempfile.mkdtemp(prefix="chatcore-soak-"))
    status = 1
    try:
        status = asyncio.run(run(args, tmp))
    finally:
        if status == 0 and not args.keep:
            shutil.rmtree(tmp)
        else:
            print(f"kept {tmp} (the SQLite file and the server's stderr)")
    return status


if __name__ == "__main__":
    sys.exit(main())
