"""The Python client loses nothing and repeats nothing across a lost connection.

Each test writes down the room as another member saw it (every offset and its
text) and checks that the Python client's iterator handed on the very same
sequence: no gap, no duplicate, in order, its own send included once (as its
``ack``, or as a ``message`` from itself when history brought it first).
"""

from __future__ import annotations

import json
import re
import secrets
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import Process
from anyio.streams.text import TextReceiveStream

from chatcore import Config
from chatcore_server import Chat, connect

from .conftest import GUARD, JSON, recv_until, serving, welcome, ws_connect
from .test_client import relayed

pytestmark = pytest.mark.anyio

Seen = list[tuple[str, int, str]]  # (room, offset, text)


class Witness:
    """Another member of the room, on a plain ``websockets`` connection, that
    records every offset of the room with its text as it sees it."""

    def __init__(self, conn: Any, room: str) -> None:
        self.conn = conn
        self.room = room
        self.seen: dict[int, str] = {}
        self._texts: dict[str, str] = {}
        self._n = 0
        self._prefix = secrets.token_hex(4)

    async def say(self, *texts: str) -> None:
        """Send each text and wait until all are stored (acknowledged)."""
        ids = []
        for text in texts:
            self._n += 1
            cid = f"{self._prefix}{self._n}"  # ids are stored for good: never reuse one
            self._texts[cid] = text
            ids.append(cid)
            frame = {"type": "send", "room": self.room, "text": text, "id": cid}
            await self.conn.send(json.dumps(frame))
        await self.read_until(lambda e: e["type"] == "ack" and e["id"] == ids[-1])

    async def read_until(self, pred: Any) -> list[Any]:
        events = await recv_until(self.conn, pred)
        for e in events:
            if e["type"] == "message":
                self.seen[e["offset"]] = e["text"]
            elif e["type"] == "ack":
                self.seen[e["offset"]] = self._texts[e["id"]]
        return events

    async def wait_for(self, text: str) -> None:
        """Read until a message with ``text`` has been seen (maybe already)."""
        if text not in self.seen.values():
            await self.read_until(lambda e: e.get("text") == text)

    def room_as_seen(self) -> Seen:
        return [(self.room, offset, text) for offset, text in sorted(self.seen.items())]


async def read_chat(chat: Chat, mine: dict[str, str], until_text: str) -> Seen:
    """What ``chat``'s iterator hands on, as (room, offset, text), up to ``until_text``."""
    seen: Seen = []
    with anyio.fail_after(GUARD * 2):
        async for event in chat:
            if event["type"] == "message":
                seen.append((event["room"], event["offset"], event["text"]))
            elif event["type"] == "ack":
                seen.append((event["room"], event["offset"], mine[event["id"]]))
            else:
                continue
            if seen[-1][2] == until_text:
                return seen
    raise AssertionError(f"the chat ended ({chat.closed}) after {seen}")


async def test_a_send_into_a_link_frozen_without_fin_is_delivered_once() -> None:
    async with (
        serving(config=Config(grace_period=30)) as srv,
        relayed(srv.port) as relay,
        ws_connect(f"{srv.ws}?user=alice&room=general", **JSON) as conn,
        connect(
            f"ws://127.0.0.1:{relay.port}/ws",
            user="bob",
            rooms=["general"],
            keepalive=0.3,
            backoff=0.05,
        ) as bob,
    ):
        alice = Witness(conn, "general")
        await welcome(conn)
        await alice.say("before")
        mine: dict[str, str] = {}
        assert await read_chat(bob, mine, "before") == [("general", 1, "before")]
        relay.freeze()  # no FIN, no reset: bob's writes vanish, nothing comes back
        with anyio.fail_after(GUARD):
            cid = await bob.send("general", "sent into the void")
        mine[cid] = "sent into the void"
        await alice.say("while frozen 1", "while frozen 2")
        seen = await read_chat(bob, mine, "sent into the void")
        await alice.wait_for("sent into the void")
        await alice.say("after")  # anything bob's send could still cause comes before this
        seen += await read_chat(bob, mine, "after")
        assert bob.reconnects == 1
        assert not bob.unacked
        assert seen == alice.room_as_seen()[1:]
        assert [text for _, _, text in alice.room_as_seen()] == [
            "before",
            "while frozen 1",
            "while frozen 2",
            "sent into the void",
            "after",
        ]


async def test_a_send_whose_ack_was_lost_is_handed_on_once() -> None:
    async with (
        serving(config=Config(grace_period=30)) as srv,
        relayed(srv.port) as relay,
        ws_connect(f"{srv.ws}?user=alice&room=general", **JSON) as conn,
        connect(
            f"ws://127.0.0.1:{relay.port}/ws",
            user="bob",
            rooms=["general"],
            keepalive=0.3,
            backoff=0.05,
        ) as bob,
    ):
        alice = Witness(conn, "general")
        await welcome(conn)
        await alice.say("before")
        mine: dict[str, str] = {}
        assert await read_chat(bob, mine, "before") == [("general", 1, "before")]
        relay.deafen()  # bob's send gets through and is stored; its ack never comes back
        mine[await bob.send("general", "stored, ack lost")] = "stored, ack lost"
        await alice.wait_for("stored, ack lost")
        await alice.say("after")
        # The resume replays bob's own message; his retry is answered with the same
        # offset, which the client must not hand on a second time.
        seen = await read_chat(bob, mine, "after")
        # The server answers bob's frames in order: the retry before this one.
        mine[await bob.send("general", "bob again")] = "bob again"
        seen += await read_chat(bob, mine, "bob again")
        await alice.wait_for("bob again")
        assert bob.reconnects == 1
        assert not bob.unacked
        assert (
            seen
            == alice.room_as_seen()[1:]
            == [
                ("general", 2, "stored, ack lost"),
                ("general", 3, "after"),
                ("general", 4, "bob again"),
            ]
        )


@asynccontextmanager
async def chatcore_process(*args: str) -> AsyncIterator[tuple[Process, int]]:
    """``python -m chatcore_server serve ARGS`` and its port, killed at the end."""
    command = [sys.executable, "-m", "chatcore_server", "serve", *args]
    async with await anyio.open_process(command) as process:
        try:
            port = 0
            assert process.stdout is not None
            with anyio.fail_after(GUARD):
                async for chunk in TextReceiveStream(process.stdout):
                    found = re.search(r"open https?://127\.0\.0\.1:(\d+)/", chunk)
                    if found:
                        port = int(found.group(1))
                        break
            yield process, port
        finally:
            if process.returncode is None:
                process.kill()


async def test_kill_9_and_restart_the_client_pages_what_it_missed(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'chat.db'}"
    mine: dict[str, str] = {}
    alice_saw: dict[int, str] = {}
    async with chatcore_process("--port", "0", "--db", db) as (first, port):
        ws = f"ws://127.0.0.1:{port}/ws"
        async with (
            relayed(port) as relay,
            connect(
                f"ws://127.0.0.1:{relay.port}/ws",
                user="bob",
                rooms=["general"],
                keepalive=0.5,
                backoff=0.05,
                retries=30,
            ) as bob,
            anyio.create_task_group() as tg,
        ):
            async with ws_connect(f"{ws}?user=alice&room=general", **JSON) as conn:
                alice = Witness(conn, "general")
                await welcome(conn)
                await alice.say("before the crash")
                assert await read_chat(bob, mine, "before the crash") == [
                    ("general", 1, "before the crash")
                ]
                relay.refusing = True  # bob stays away until we let him back
                first.kill()  # SIGKILL: no close frames, no goodbye
                await first.wait()

            async def send_while_down() -> None:
                mine[await bob.send("general", "sent while down")] = "sent while down"

            tg.start_soon(send_while_down)  # the old client waited here for a connection
            # Others come back first and talk before bob's welcome: a new session
            # does not replay that to bob, he must page it from history.
            async with (
                chatcore_process("--port", str(port), "--db", db),
                ws_connect(f"{ws}?user=alice&room=general", **JSON) as conn,
                ws_connect(f"{ws}?user=carol&room=general", **JSON) as conn2,
            ):
                alice, carol = Witness(conn, "general"), Witness(conn2, "general")
                await welcome(conn)
                await welcome(conn2)
                await alice.say(*(f"alice {i}" for i in range(8)))
                await carol.say(*(f"carol {i}" for i in range(8)))
                relay.refusing = False
                await alice.wait_for("sent while down")
                await alice.say("after")
                seen = await read_chat(bob, mine, "after")
                alice_saw.update(alice.seen)
        assert not bob.unacked
    assert seen == [("general", offset, text) for offset, text in sorted(alice_saw.items())]
    assert [offset for _, offset, _ in seen] == list(range(2, 20))
    assert [text for _, _, text in seen][-2:] == ["sent while down", "after"]


async def test_after_the_grace_period_the_client_pages_a_long_gap() -> None:
    # Pages come from the store (a small window in memory) and are smaller than
    # the client asks for (history_page_max): the client must still miss none.
    config = Config(
        grace_period=0.2,
        history_window=20,
        history_page_max=7,
        rate_burst=1000,
        rate_per_second=1000,
        request_burst=1000,
        request_per_second=1000,
    )
    mine: dict[str, str] = {}
    async with (
        serving(config=config) as srv,
        relayed(srv.port) as relay,
        ws_connect(f"{srv.ws}?user=alice&room=general", **JSON) as conn,
        connect(
            f"ws://127.0.0.1:{relay.port}/ws",
            user="bob",
            rooms=["general"],
            keepalive=0.3,
            backoff=0.05,
            retries=30,
        ) as bob,
    ):
        alice = Witness(conn, "general")
        await welcome(conn)
        await alice.read_until(lambda e: e["type"] == "joined" and e["user"] == "bob")
        await alice.say("before")
        assert await read_chat(bob, mine, "before") == [("general", 1, "before")]
        token = bob.resume_token
        relay.refusing = True
        await relay.cut()  # the server sees bob go; bob notices nothing yet
        mine[await bob.send("general", "sent while cut off")] = "sent while cut off"
        await alice.read_until(lambda e: e["type"] == "left" and e["user"] == "bob")
        await alice.say(*(f"missed {i}" for i in range(230)))
        relay.refusing = False
        async with anyio.create_task_group() as tg:
            # Live traffic while bob pages: it must wait behind the gap.
            tg.start_soon(alice.say, *(f"live {i}" for i in range(20)))
            seen = await read_chat(bob, mine, "live 19")
        await alice.wait_for("sent while cut off")
        await alice.say("after")
        seen += await read_chat(bob, mine, "after")
        assert bob.resume_token != token  # a new session: the old one expired
        assert not bob.unacked
        texts = [text for _, _, text in seen]
        assert texts.count("sent while cut off") == 1
        assert seen == alice.room_as_seen()[1:]
        assert [offset for _, offset, _ in seen] == list(range(2, 2 + 230 + 20 + 2))


async def test_a_history_request_of_the_program_comes_after_the_gap() -> None:
    """The program's own ``history`` answers are handed on; the client's are not."""
    config = Config(
        grace_period=0.2,
        rate_burst=1000,
        rate_per_second=1000,
        request_burst=1000,
        request_per_second=1000,
    )
    async with (
        serving(config=config) as srv,
        relayed(srv.port) as relay,
        ws_connect(f"{srv.ws}?user=alice&room=general", **JSON) as conn,
        connect(
            f"ws://127.0.0.1:{relay.port}/ws", user="bob", rooms=["general"], keepalive=0.3
        ) as bob,
    ):
        alice = Witness(conn, "general")
        await welcome(conn)
        await alice.say("one")
        assert await read_chat(bob, {}, "one") == [("general", 1, "one")]
        relay.refusing = True
        await relay.cut()
        await alice.read_until(lambda e: e["type"] == "left" and e["user"] == "bob")
        await alice.say(*(f"missed {i}" for i in range(150)))
        relay.refusing = False
        histories, texts = [], []
        with anyio.fail_after(GUARD):
            async for event in bob:
                if event["type"] == "welcome":
                    assert event["resumed"] is False
                    # The gap is being filled: this request waits for it to be.
                    await bob.history("general", before=3, limit=2)
                if event["type"] == "history":
                    histories.append(event)
                    break
                if event["type"] == "message":
                    texts.append(event["text"])
        assert texts == [f"missed {i}" for i in range(150)]
        assert len(histories) == 1
        assert [m["text"] for m in histories[0]["messages"]] == ["one", "missed 0"]
