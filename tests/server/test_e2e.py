"""End-to-end encrypted direct messages between Python clients through a real server.

The server runs as its own process with a SQLite file and its log (at debug
level) in files; after the conversation, the bytes of the database, of its
write-ahead log and of the server's log are searched for the plaintext, and so
is the room's history over HTTP: none of them holds it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import signal
import sys
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import Process

from chatcore_server.client import Chat, connect

ROOT = Path(__file__).resolve().parents[2]
URL_LINE = re.compile(rb"chatcore is running: open http://127\.0\.0\.1:(\d+)/")
ROOM = "dm:alice:bob"
GUARD = 20.0

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@contextlib.asynccontextmanager
async def server(tmp_path: Path) -> AsyncIterator[int]:
    log = (tmp_path / "server.log").open("ab")
    process: Process = await anyio.open_process(
        [
            sys.executable,
            "-m",
            "chatcore_server",
            "serve",
            "--port",
            "0",
            "--db",
            f"sqlite:///{tmp_path / 'chat.db'}",
            "--log-level",
            "debug",
        ],
        cwd=ROOT,
        stderr=log,
    )
    log.close()
    try:
        assert process.stdout is not None
        seen = b""
        with anyio.fail_after(30):
            while (match := URL_LINE.search(seen)) is None:
                seen += await process.stdout.receive()
        yield int(match.group(1))
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        with anyio.fail_after(30):
            await process.wait()


async def until(chat: Chat, wanted: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    with anyio.fail_after(GUARD):
        async for event in chat:
            if wanted(event):
                return event
    raise AssertionError(f"chat ended: {chat.closed}")


def kind(name: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e.get("type") == name


def in_room(e: dict[str, Any]) -> bool:
    return e.get("type") in ("message", "undecryptable") and e.get("room") == ROOM


async def device(chat: Chat, path: Path) -> str:
    name = await chat.enable_e2e(path)
    await until(chat, kind("keys_published"))
    return name


def http_history(port: int, user: str) -> bytes:
    url = f"http://127.0.0.1:{port}/rooms/{ROOM}/messages?user={user}&limit=100"
    with urllib.request.urlopen(url, timeout=GUARD) as reply:
        return bytes(reply.read())


async def test_an_encrypted_conversation_leaves_no_plaintext_on_the_server(tmp_path: Path) -> None:
    secrets_said = ["the treasure is under the old oak", "bring the map at midnight"]
    async with server(tmp_path) as port:
        url = f"ws://127.0.0.1:{port}/ws"
        async with (
            connect(url, user="bob") as bob_laptop,
            connect(url, user="bob") as bob_phone,
            connect(url, user="alice") as alice,
        ):
            await device(bob_laptop, tmp_path / "bob-laptop.json")
            await device(bob_phone, tmp_path / "bob-phone.json")
            await device(alice, tmp_path / "alice.json")

            await alice.dm("bob", secrets_said[0], id="s1")
            for bob in (bob_laptop, bob_phone):  # the second device reads it too
                got = await until(bob, in_room)
                assert (got["type"], got["text"], got["encrypted"]) == (
                    "message",
                    secrets_said[0],
                    True,
                )
                assert (got["from"], got["id"], got["offset"]) == ("alice", "s1", 1)
            await bob_laptop.dm("alice", secrets_said[1])
            reply = await until(alice, in_room)
            assert (reply["text"], reply["encrypted"]) == (secrets_said[1], True)
            # bob's other device gets its own copy of bob's message
            mine = await until(bob_phone, in_room)
            assert (mine["text"], mine["from"]) == (secrets_said[1], "bob")

            # History over HTTP holds the envelopes, not what they say.
            page = http_history(port, "alice")
            assert json.loads(page)["messages"][0]["enc"]["payloads"]
            for said in secrets_said:
                assert said.encode() not in page

    # The server has stopped: its database and log are complete.
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("chat.db*"))
    log = (tmp_path / "server.log").read_bytes()
    # Not a search of nothing: the stored messages are there, as ciphertext, and
    # the log holds the server's debug lines.
    assert stored.count(b"\x01e2e:") >= 2
    assert b"alice" in log
    for said in secrets_said:
        for haystack in (stored, log):
            assert said.encode() not in haystack
            assert base64.b64encode(said.encode()) not in haystack


async def test_a_tampered_message_and_one_from_before_the_device_are_not_shown(
    tmp_path: Path,
) -> None:
    async with server(tmp_path) as port:
        url = f"ws://127.0.0.1:{port}/ws"
        async with connect(url, user="bob") as bob, connect(url, user="alice") as alice:
            await device(bob, tmp_path / "bob.json")
            await device(alice, tmp_path / "alice.json")
            await alice.dm("bob", "before the new phone")
            assert (await until(bob, in_room))["text"] == "before the new phone"

            # A ciphertext altered on the way (one bit of bob's payload flipped).
            assert alice._device is not None
            peers = await alice._devices_of("bob")
            enc = alice._device.seal(ROOM, "you will not read this", peers)
            payload = enc["payloads"][bob._device.device if bob._device else ""]
            ct = bytearray(base64.b64decode(payload["ct"]))
            ct[0] ^= 1
            payload["ct"] = base64.b64encode(bytes(ct)).decode()
            await alice._submit("forged", {"type": "dm", "to": "bob", "enc": enc, "id": "forged"})
            marker = await until(bob, in_room)
            assert marker["type"] == "undecryptable"
            assert marker["reason"] == "message was altered or is not for this device"
            assert (marker["offset"], marker["id"]) == (2, "forged")

            # A device that did not exist when a message was sent says so.
            async with connect(url, user="bob") as phone:
                await device(phone, tmp_path / "bob-phone.json")
                await phone.history(ROOM)
                page = await until(phone, kind("history"))
                first = page["messages"][0]
                assert first["type"] == "undecryptable"
                assert first["reason"] == "cannot decrypt on this device"
                assert "before the new phone" not in json.dumps(page)


async def test_a_device_whose_stock_runs_low_publishes_more(tmp_path: Path) -> None:
    async with server(tmp_path) as port:
        url = f"ws://127.0.0.1:{port}/ws"
        async with connect(url, user="bob") as bob, connect(url, user="carol") as carol:
            await device(bob, tmp_path / "bob.json")  # 50 prekeys
            await carol.enable_e2e(tmp_path / "carol.json")
            for _ in range(41):  # leaves 9: under the server's threshold of 10
                await carol._devices_of("bob", fresh=True)
            low = await until(bob, kind("keys_low"))
            assert low["prekeys"] == 9
            restocked = await until(bob, kind("keys_published"))
            assert restocked["prekeys"] == 59
