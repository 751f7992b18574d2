"""Measure the server on this machine (not a test; run it by hand).

    .venv/bin/python tests/server/measure.py connections --count 10000
    .venv/bin/python tests/server/measure.py connections --count 1000 --room general
    .venv/bin/python tests/server/measure.py fanout --members 100 --seconds 5

``connections`` starts ``chatcore serve`` in a child process, opens COUNT
WebSocket connections (each read to its welcome), and prints how many were
held and the server's RSS growth per connection. ``fanout`` puts MEMBERS
clients in one room, has a few of them send ~100-byte messages as fast as
their acks come back, and prints the messages delivered per second (frames
received by all members, counted from the bytes read).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import resource
import subprocess
import sys
import time

SERVER = """
import logging, sys, anyio
from chatcore import Config
from chatcore_server import ChatServer, Limits
logging.basicConfig(level=logging.WARNING)
config = Config(rate_burst=10**6, rate_per_second=1e6, request_burst=10**6, request_per_second=1e6)
server = ChatServer(config=config, port=0, limits=Limits(max_connections=int(sys.argv[1])))
async def main():
    async with anyio.create_task_group() as tg:
        url = await tg.start(server.serve)
        print(url, flush=True)
anyio.run(main)
"""


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().split()
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def raise_nofile() -> int:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def start_server(max_connections: int) -> tuple[subprocess.Popen[str], str, int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(max_connections)],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=raise_nofile,  # noqa: PLW1509 (no threads here)
    )
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    port = int(re.search(r":(\d+)/", url).group(1))  # type: ignore[union-attr]
    return proc, url, port


def handshake(user: str, rooms: list[str]) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    query = "&".join([f"user={user}"] + [f"room={r}" for r in rooms])
    return (
        f"GET /ws?{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Protocol: chatcore.v1\r\n\r\n"
    ).encode()


def frame(text: str) -> bytes:
    payload = text.encode()
    n = len(payload)
    head = bytes((0x81, 0x80 | n)) if n < 126 else bytes((0x81, 0x80 | 126)) + n.to_bytes(2, "big")
    return head + b"\0\0\0\0" + payload


async def open_one(
    port: int, user: str, rooms: list[str]
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(handshake(user, rooms))
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(head.split(b"\r\n")[0].decode())
    await reader.readexactly(2)  # the welcome frame's first bytes: it arrived
    return reader, writer


async def drain(reader: asyncio.StreamReader) -> None:
    while await reader.read(65536):
        pass


async def connections(count: int, room: str | None) -> None:
    raise_nofile()
    proc, _, port = start_server(count + 10)
    try:
        time.sleep(0.5)
        base = rss_kib(proc.pid)
        held: list[asyncio.StreamWriter] = []
        tasks = []
        gate = asyncio.Semaphore(100)
        failed = 0
        started = time.monotonic()

        async def one(i: int) -> None:
            nonlocal failed
            async with gate:
                try:
                    reader, writer = await open_one(port, f"u{i}", [room] if room else [])
                except (OSError, ConnectionError, asyncio.IncompleteReadError):
                    failed += 1
                    return
            held.append(writer)
            tasks.append(asyncio.ensure_future(drain(reader)))

        cpu0 = cpu_seconds(proc.pid)
        await asyncio.gather(*(one(i) for i in range(count)))
        elapsed = time.monotonic() - started
        server_cpu = cpu_seconds(proc.pid) - cpu0
        await asyncio.sleep(1.0)
        grown = rss_kib(proc.pid) - base
        print(
            f"held {len(held)} of {count} connections ({failed} failed) in {elapsed:.1f} s "
            f"({server_cpu:.1f} s of server CPU); "
            f"server RSS {base} KiB -> {base + grown} KiB: "
            f"{grown / max(1, len(held)):.1f} KiB per connection"
            + (f" (all in room {room!r})" if room else " (no room)")
        )
        for w in held:
            w.close()
        for t in tasks:
            t.cancel()
    finally:
        proc.terminate()
        proc.wait(timeout=15)


async def fanout(members: int, seconds: float, senders: int, window: int) -> None:
    raise_nofile()
    proc, _, port = start_server(members + 10)
    try:
        received = 0
        conns = []
        for i in range(members):
            conns.append(await open_one(port, f"m{i}", ["general"]))
        text = "x" * 100
        sample = json.dumps(
            {
                "type": "message",
                "room": "general",
                "offset": 100000,
                "epoch": "m1",
                "from": "m0",
                "text": text,
                "ts": "2026-11-22T00:00:00.000Z",
                "id": None,
            },
            separators=(",", ":"),
        )
        per_frame = len(sample) + 4  # 2-byte length header plus the text frame opcode byte
        stop = asyncio.Event()

        async def count(reader: asyncio.StreamReader) -> None:
            nonlocal received
            while not stop.is_set():
                data = await reader.read(262144)
                if not data:
                    return
                received += len(data)

        async def send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            # Closed loop: WINDOW messages in flight, the next batch when their acks are back.
            nonlocal received
            batch = frame(json.dumps({"type": "send", "room": "general", "text": text})) * window
            tail = b""
            while not stop.is_set():
                writer.write(batch)
                acks = 0
                while acks < window:
                    data = await reader.read(262144)
                    if not data:
                        return
                    received += len(data)
                    acks += (tail + data).count(b'"type":"ack"')
                    tail = data[-16:]

        readers = [asyncio.ensure_future(count(r)) for r, _ in conns[senders:]]
        await asyncio.sleep(1.0)
        writers = [asyncio.ensure_future(send(r, w)) for r, w in conns[:senders]]
        await asyncio.sleep(1.0)  # warm up
        start_bytes, start = received, time.monotonic()
        cpu0 = sum(os.times()[:2])
        with open(f"/proc/{proc.pid}/stat") as f:
            s0 = f.read().split()
        await asyncio.sleep(seconds)
        with open(f"/proc/{proc.pid}/stat") as f:
            s1 = f.read().split()
        delivered = (received - start_bytes) / per_frame
        elapsed = time.monotonic() - start
        server_cpu = (int(s1[13]) + int(s1[14]) - int(s0[13]) - int(s0[14])) / os.sysconf(
            "SC_CLK_TCK"
        )
        client_cpu = sum(os.times()[:2]) - cpu0
        stop.set()
        print(
            f"{members} members in one room, {senders} senders: "
            f"{delivered / elapsed:,.0f} messages delivered/s "
            f"(server CPU {server_cpu / elapsed:.0%}, "
            f"this client {client_cpu / elapsed:.0%} of a core)"
        )
        for t in readers + writers:
            t.cancel()
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="what", required=True)
    c = sub.add_parser("connections")
    c.add_argument("--count", type=int, default=10_000)
    c.add_argument("--room")
    f = sub.add_parser("fanout")
    f.add_argument("--members", type=int, default=100)
    f.add_argument("--seconds", type=float, default=5.0)
    f.add_argument("--senders", type=int, default=4)
    f.add_argument("--window", type=int, default=20)
    args = p.parse_args()
    if args.what == "connections":
        asyncio.run(connections(args.count, args.room))
    else:
        asyncio.run(fanout(args.members, args.seconds, args.senders, args.window))


if __name__ == "__main__":
    main()
