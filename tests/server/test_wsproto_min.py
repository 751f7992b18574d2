"""The benchmarks' ceiling server (``benchmarks/peers/wsproto_server.py``) against
real clients: it must be a correct fan-out, or its rates say nothing.

Invariant: every member of a room but the sender gets every message sent to
that room exactly once, in each sender's order; nobody gets another room's
messages; a member that stops reading is cut off and the others lose nothing.
"""

from __future__ import annotations

import json
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks._wire import FrameReader, client_frame, open_many  # noqa: E402
from benchmarks.peers.wsproto_server import QUEUE_FRAMES  # noqa: E402


@pytest.fixture
def port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = int(s.getsockname()[1])
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.peers.wsproto_server", "--port", str(free)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert b"listening" in line, line
        yield free
    finally:
        proc.kill()
        proc.wait(10)


def send(sock: socket.socket, room: str, text: str) -> None:
    payload = json.dumps({"type": "send", "room": room, "text": text}).encode()
    sock.setblocking(True)
    sock.sendall(client_frame(payload))
    sock.setblocking(False)


class Member:
    """One client socket and the messages it has read so far."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = FrameReader()
        self.got: list[dict[str, object]] = []

    def texts(self) -> list[str]:
        return [str(m["text"]) for m in self.got]


def read(members: list[Member], until: int | None = None, timeout: float = 10.0) -> None:
    """Read until every member has ``until`` messages, or for ``timeout`` seconds
    (``until=None``: the whole time, to see that nothing more comes)."""
    by_fd = {m.sock.fileno(): m for m in members}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if until is not None and all(len(m.got) >= until for m in members):
            return
        ready, _, _ = select.select([m.sock for m in members], [], [], 0.05)
        for sock in ready:
            m = by_fd[sock.fileno()]
            try:
                data = sock.recv(1 << 20)
            except BlockingIOError:
                continue
            for op, payload in m.reader.feed(data):
                if op == 1:
                    m.got.append(json.loads(payload))


def test_every_member_but_the_sender_gets_each_message_once_in_order(port: int) -> None:
    users = [("a", "r"), ("b", "r"), ("c", "r"), ("d", "r"), ("x", "s"), ("y", "s")]
    opened = open_many(port, [f"/ws?user={u}&room={r}" for u, r in users], None)
    m = {u: Member(s) for (u, _), (s, _) in zip(users, opened, strict=True)}
    n = 200
    for i in range(n):  # two senders interleaved, in room r only
        send(m["a"].sock, "r", f"a{i}")
        send(m["b"].sock, "r", f"b{i}")
    read([m["c"], m["d"]], until=2 * n)
    read([m["a"], m["b"]], until=n)
    read(list(m.values()), timeout=0.3)  # and then nothing more: no duplicates
    for user in ("c", "d"):
        texts = m[user].texts()
        assert len(texts) == 2 * n
        assert [t for t in texts if t[0] == "a"] == [f"a{i}" for i in range(n)]
        assert [t for t in texts if t[0] == "b"] == [f"b{i}" for i in range(n)]
        assert {(x["room"], x["type"]) for x in m[user].got} == {("r", "message")}
    assert m["a"].texts() == [f"b{i}" for i in range(n)]  # not its own
    assert m["b"].texts() == [f"a{i}" for i in range(n)]
    assert not m["x"].got  # the other room heard nothing
    assert not m["y"].got
    for x in m.values():
        x.sock.close()


def test_a_member_that_stops_reading_is_cut_off_and_the_others_lose_nothing(port: int) -> None:
    ((stalled, _),) = open_many(port, ["/ws?user=z&room=r"], None, rcvbuf=4096)
    opened = open_many(port, ["/ws?user=a&room=r", "/ws?user=c&room=r"], None)
    sender, reader = opened[0][0], Member(opened[1][0])
    # 1 KB each: past what the kernel holds for the stalled member (up to tcp_wmem[2],
    # 4 MiB here), the transport's 64 KiB, then its queue of QUEUE_FRAMES frames.
    n = QUEUE_FRAMES + 8_000
    pad = "x" * 1000
    for i in range(n):
        send(sender, "r", f"{i}:{pad}")
        if i % 200 == 199:  # the reading member keeps up as it goes
            read([reader], until=i - 400, timeout=5)
    read([reader], until=n)
    assert [t.split(":")[0] for t in reader.texts()] == [str(i) for i in range(n)]
    # The stalled member was reset: reading it ends (EOF or reset), it does not block.
    stalled.setblocking(True)
    stalled.settimeout(10)
    assert drained(stalled) < n * 1000  # ended early: it never got everything
    for s in (stalled, sender, reader.sock):
        s.close()


def drained(sock: socket.socket) -> int:
    """Read ``sock`` to its end (EOF or reset); how many bytes came. A stream that
    does not end within the socket's timeout fails the test."""
    total = 0
    while True:
        try:
            data = sock.recv(1 << 20)
        except ConnectionResetError:
            return total
        except TimeoutError:
            pytest.fail(f"not cut off: {total} bytes, then nothing")
        if not data:
            return total
        total += len(data)


def test_a_ping_is_answered(port: int) -> None:
    ((sock, _),) = open_many(port, ["/ws?user=p&room=r"], None)
    sock.setblocking(True)
    sock.settimeout(10)
    sock.sendall(client_frame(b"hi", opcode=9))
    reader = FrameReader()
    frames: list[tuple[int, bytes]] = []
    while not frames:
        frames += reader.feed(sock.recv(4096))
    assert frames == [(10, b"hi")]
    sock.close()
