"""Record a real server's session, replay it: identical; change a default: the divergence."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from chatcore import Config, RecordError, replay
from chatcore_host import RecordFile, read_record

from .conftest import JSON, kill, recv, recv_until, serving, welcome, ws_connect

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]


def send(room: str, text: str, cid: str | None = None) -> str:
    frame: dict[str, Any] = {"type": "send", "room": room, "text": text}
    if cid is not None:
        frame["id"] = cid
    return json.dumps(frame)


def is_ack(cid: str) -> Any:
    return lambda e: e["type"] == "ack" and e["id"] == cid


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _healthy(port: int) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}/healthz", timeout=1.0) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


@contextmanager
def chatcore_serve(*extra: str) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    port = _free_port()
    argv = [sys.executable, "-m", "chatcore_server", "serve", "--port", str(port)]
    argv += ["--db", "memory", "--log-level", "warning", *extra]
    process = subprocess.Popen(argv, cwd=ROOT, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not _healthy(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"server did not start: {process.stderr and process.stderr.read()!r}"
                )
            time.sleep(0.05)
        yield port, process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chatcore_server", *args],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ,
    )


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the server is another process; the client's loop is not what is tested


async def session(ws: str) -> None:
    """Joins, sends, a slow reader, a drop and a resume, typing and a history page."""
    async with (
        ws_connect(f"{ws}?user=alice&room=general", **JSON) as alice,
        ws_connect(f"{ws}?user=carol&room=general", **JSON) as carol,
    ):
        await welcome(alice)
        await welcome(carol)
        bob = await ws_connect(f"{ws}?user=bob&room=general&room=games", **JSON).__aenter__()
        token = (await welcome(bob))["resume"]
        for i in range(3):
            await alice.send(send("general", f"hello {i}", f"a{i}"))
        await recv_until(alice, is_ack("a2"))
        await bob.send(send("games", "anyone?", "b1"))
        await recv_until(bob, is_ack("b1"))
        # carol reads nothing while a burst goes by (she is a slow reader).
        for i in range(6):  # within the rate limit's burst of 10
            await alice.send(send("general", f"burst {i} " + "x" * 30_000, f"burst{i}"))
        await recv_until(alice, is_ack("burst5"))
        burst = await recv_until(bob, lambda e: e.get("text", "").startswith("burst 5"))
        last = burst[-1]["offset"]
        await kill(bob)
        await alice.send(send("general", "while bob is away", "a-away"))
        await recv_until(alice, is_ack("a-away"))
        query = f"user=bob&room=general&resume={token}&offset=general:{last}"
        async with ws_connect(f"{ws}?{query}", **JSON) as bob2:
            w = await recv(bob2)
            assert w["resumed"] is True
            missed = await recv_until(bob2, lambda e: e.get("text") == "while bob is away")
            assert [e["text"] for e in missed if e["type"] == "message"] == ["while bob is away"]
            await bob2.send(json.dumps({"type": "typing", "room": "general"}))
            await bob2.send(json.dumps({"type": "history", "room": "general", "limit": 3}))
            await recv_until(bob2, lambda e: e["type"] == "history")
        # carol catches up (or was closed as too slow: either is recorded).
        with anyio.move_on_after(10):
            async for data in carol:
                if json.loads(data).get("text") == "while bob is away":
                    break


async def test_a_recorded_server_session_replays_identically_and_a_changed_default_does_not(
    tmp_path: Path,
) -> None:
    record = tmp_path / "run.jsonl"
    with chatcore_serve("--record", str(record)) as (port, process):
        await session(f"ws://127.0.0.1:{port}/ws")
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    lines = record.read_text().splitlines()
    kinds = [json.loads(line).get("cmd", {}).get("type") for line in lines[1:]]
    for kind in ("Connect", "Receive", "Disconnected", "Drained", "Appended", "Shutdown"):
        assert kind in kinds, kind
    assert oct(record.stat().st_mode & 0o777) == "0o600"

    same = run_cli("replay", str(record))
    assert same.returncode == 0, same.stdout + same.stderr
    assert "identical" in same.stdout

    changed = run_cli("replay", str(record), "--config-override", "echo=true")
    assert changed.returncode == 1, changed.stdout + changed.stderr
    # Alice's first message now comes back to her too, when the log numbers it.
    assert "divergence at step" in changed.stdout
    assert "command: Appended(" in changed.stdout
    assert "hello 0" in changed.stdout

    broken = run_cli("replay", str(tmp_path / "missing.jsonl"))
    assert broken.returncode == 2


async def chatter(record: RecordFile) -> None:
    async with serving(record=record) as srv:
        await chat_as_amy(srv.ws)


async def chat_as_amy(ws: str) -> None:
    async with ws_connect(f"{ws}?user=amy&room=general", **JSON) as amy:
        await welcome(amy)
        for i in range(10):  # within the rate limit's burst
            await amy.send(send("general", f"m{i} " + "y" * 600, f"c{i}"))
        await recv_until(amy, is_ack("c9"))


async def test_a_rotated_record_replays_while_its_first_part_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "rot.jsonl"
    record = RecordFile(path, max_bytes=2048, keep=100)
    await chatter(record)
    assert path.with_name("rot.jsonl.3").exists()  # rotated several times
    assert replay(read_record(path)) is None

    short = tmp_path / "short.jsonl"
    record = RecordFile(short, max_bytes=2048, keep=1)
    await chatter(record)
    assert not short.with_name("short.jsonl.2").exists()
    with pytest.raises(RecordError, match="header"):
        replay(read_record(short))


async def test_timers_are_recorded_a_session_that_expired_replays_as_expired(
    tmp_path: Path,
) -> None:
    path = tmp_path / "grace.jsonl"
    config = Config(grace_period=0.3)
    async with serving(config=config, record=RecordFile(path)) as srv:
        await expire_and_come_back(srv.ws)
    assert replay(read_record(path)) is None
    assert any('"tick":true' in line for line in read_record(path))


async def expire_and_come_back(ws: str) -> None:
    async with ws_connect(f"{ws}?user=amy&room=general", **JSON) as amy:
        await welcome(amy)
        bo = await ws_connect(f"{ws}?user=bo&room=general", **JSON).__aenter__()
        token = (await welcome(bo))["resume"]
        await kill(bo)
        await recv_until(amy, lambda e: e["type"] == "left")  # the timer ran out
        async with ws_connect(f"{ws}?user=bo&room=general&resume={token}", **JSON) as bo2:
            assert (await welcome(bo2))["resumed"] is False


SDP_OFFER = (
    "v=0\r\no=- 7721 2 IN IP4 203.0.113.9\r\ns=-\r\na=ice-ufrag:Wq7v\r\n"
    "a=ice-pwd:s3cr3tIcePassw0rd\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"
)
SDP_ANSWER = SDP_OFFER.replace("203.0.113.9", "198.51.100.4").replace("Wq7v", "Zk2p")
ICE = [
    "candidate:1 1 udp 2122260223 192.0.2.10 50001 typ host",
    "candidate:2 1 udp 1686052607 203.0.113.77 61002 typ srflx raddr 192.0.2.10 rport 50001",
]


async def test_a_recorded_call_keeps_no_signal_on_disk_and_replays_identically(
    tmp_path: Path,
) -> None:
    path = tmp_path / "call.jsonl"
    async with (
        serving(record=RecordFile(path)) as srv,
        ws_connect(f"{srv.ws}?user=alice&room=general", **JSON) as alice,
        ws_connect(f"{srv.ws}?user=bob&room=general", **JSON) as bob,
    ):
        await welcome(alice)
        await welcome(bob)
        await alice.send(json.dumps({"type": "call", "call": "k1", "to": "bob"}))
        await alice.send(json.dumps({"type": "offer", "call": "k1", "sdp": SDP_OFFER}))
        cand = {"type": "candidate", "call": "k1", "mid": "0", "index": 0}
        await alice.send(json.dumps({**cand, "candidate": ICE[0]}))
        got = await recv_until(bob, lambda e: e["type"] == "candidate")
        assert [e.get("sdp") for e in got if e["type"] == "offer"] == [SDP_OFFER]
        await bob.send(json.dumps({"type": "answer", "call": "k1", "sdp": SDP_ANSWER}))
        await bob.send(json.dumps({**cand, "candidate": ICE[1]}))
        got = await recv_until(alice, lambda e: e["type"] == "candidate")
        assert got[-1]["candidate"] == ICE[1]
        await alice.send(json.dumps({"type": "connected", "call": "k1"}))
        await alice.send(json.dumps({"type": "hangup", "call": "k1"}))
        await recv_until(bob, lambda e: e["type"] == "ended")
        await alice.send(send("general", "after the call", "a1"))
        await recv_until(alice, is_ack("a1"))
    data = path.read_bytes()
    assert b'"Receive"' in data
    assert b"after the call" in data
    secrets = ["203.0.113.9", "198.51.100.4", "s3cr3tIcePassw0rd", "Wq7v", "Zk2p", *ICE]
    for secret in secrets:
        assert secret.encode() not in data, secret
    assert replay(read_record(path)) is None
    same = run_cli("replay", str(path))
    assert same.returncode == 0, same.stdout + same.stderr
