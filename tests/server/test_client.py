"""The Python client on links that go quiet: alive but silent, or dead without a word."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import pytest

from chatcore import Config
from chatcore_server import connect

from .conftest import GUARD, JSON, serving, welcome, ws_connect

pytestmark = pytest.mark.anyio


class Relay:
    """A TCP relay whose open connections can be frozen: bytes stop flowing both
    ways while both sockets stay open, as when a NAT forgets a mapping or a
    laptop sleeps. New connections flow normally, unless ``refusing``: then they
    are closed as soon as they are accepted (the server seems to be down)."""

    def __init__(self) -> None:
        self.frozen: set[int] = set()  # generations no longer forwarded
        self.generation = 0
        self.port = 0
        self.refusing = False
        self.deaf: set[int] = set()  # generations whose server-to-client bytes are dropped
        self._upstreams: dict[int, list[anyio.abc.ByteStream]] = {}

    def freeze(self) -> None:
        self.frozen.add(self.generation)
        self.generation += 1

    def deafen(self) -> None:
        """Stop forwarding what the server says on open connections; the client's
        bytes still reach it (an answer lost on the way back)."""
        self.deaf.add(self.generation)
        self.generation += 1

    async def cut(self) -> None:
        """Freeze, and close the server's side: the server sees the connection end
        (its grace period starts) while the client hears nothing at all."""
        cut = self.generation
        self.freeze()
        for upstream in self._upstreams.pop(cut, []):
            await upstream.aclose()

    async def serve(
        self, target: int, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        task_status.started()

        async def pump(
            src: anyio.abc.ByteStream, dst: anyio.abc.ByteStream, gen: int, down: bool = False
        ) -> None:
            try:
                async for data in src:
                    if gen in self.frozen or (down and gen in self.deaf):
                        await anyio.sleep_forever()
                    await dst.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass

        async def handle(client: anyio.abc.SocketStream) -> None:
            gen = self.generation
            if self.refusing:
                await client.aclose()
                return
            try:
                upstream = await anyio.connect_tcp("127.0.0.1", target)
            except OSError:
                await client.aclose()
                return
            self._upstreams.setdefault(gen, []).append(upstream)
            async with client, upstream, anyio.create_task_group() as tg:
                tg.start_soon(pump, client, upstream, gen)
                await pump(upstream, client, gen, down=True)
                if gen in self.frozen:
                    await anyio.sleep_forever()  # the client must not hear the end
                tg.cancel_scope.cancel()

        await listener.serve(handle)


@asynccontextmanager
async def relayed(target: int) -> AsyncIterator[Relay]:
    relay = Relay()
    async with anyio.create_task_group() as tg:
        await tg.start(relay.serve, target)
        yield relay
        tg.cancel_scope.cancel()


def send(room: str, text: str) -> str:
    return json.dumps({"type": "send", "room": room, "text": text})


async def test_a_quiet_chat_stays_connected_and_a_frozen_link_is_replaced() -> None:
    async with (
        serving(config=Config(grace_period=30)) as srv,
        relayed(srv.port) as relay,
        ws_connect(f"{srv.ws}?user=alice&room=general", **JSON) as alice,
        connect(
            f"ws://127.0.0.1:{relay.port}/ws", user="bob", rooms=["general"], keepalive=0.5
        ) as bob,
    ):
        await welcome(alice)
        with anyio.fail_after(GUARD):
            assert (await bob.receive())["type"] == "welcome"
            assert (await bob.receive())["type"] == "members"
            # Silent for four keepalive periods: the pings are answered, nothing changes.
            with anyio.move_on_after(2.0):
                event = await bob.receive()
                raise AssertionError(f"unexpected {event}")
            assert bob.reconnects == 0
            relay.freeze()  # bob's link goes dead without a FIN or a reset
            await alice.send(send("general", "while frozen"))
            texts, resumed = [], None
            async for event in bob:
                if event["type"] == "welcome":
                    resumed = event["resumed"]
                if event["type"] == "message":
                    texts.append(event["text"])
                    break
        assert bob.reconnects == 1
        assert resumed is True  # the server still held the session: nothing was lost
        assert texts == ["while frozen"]


async def test_the_client_keeps_a_crowded_rooms_members_from_presence_frames() -> None:
    config = Config(presence_batch_above=2, presence_interval=0.05)
    async with (
        serving(config=config) as srv,
        connect(srv.ws, user="bob", rooms=["hall"]) as bob,
        ws_connect(f"{srv.ws}?user=alice&room=hall", **JSON) as alice,
        ws_connect(f"{srv.ws}?user=carol&room=hall", **JSON) as carol,
    ):
        for ws in (alice, carol):
            await welcome(ws)
        async with ws_connect(f"{srv.ws}?user=dave&room=hall", **JSON) as dave:
            await welcome(dave)
        # dave closed: the room is a crowd (4 > 2), so his coming and going is batched
        with anyio.fail_after(GUARD):
            async for event in bob:
                if event["type"] == "presence" and "dave" in event["leaves"]:
                    break
        assert bob.members("hall") == {"alice", "bob", "carol"}
