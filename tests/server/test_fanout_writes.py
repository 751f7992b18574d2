"""A fan-out written to every member's socket at once: one member's trouble is its own.

When every recipient of a turn's fan-out can take the frame straight away, the
flush writes it to all of their sockets from C-level loops (``_write_all``: a
``map`` over ``os.write``). A socket that refuses the write (full: EAGAIN; reset:
EPIPE), takes part of it, or a write that raises what it never should, must cost
that member alone: every other member gets each message once and in order, a
member whose socket was full gets it later and in order, and a member whose socket
was reset is dropped while the room goes on. The straight path exists on asyncio
only (trio's peers are written through ``Peer.flush``), so these tests run there.

Faults come in through ``os.write`` itself, for one member's socket and one
message, as test_hostile plants its bugs; each test also checks that the fault
was met inside ``_write_all``, so that it tests the path it is about.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import replace
from typing import Any

import anyio
import pytest

from chatcore import Config
from chatcore_server._server import _write_all

from .conftest import (
    GUARD,
    JSON,
    Running,
    ended,
    kill,
    masked_frame,
    recv_until,
    send_raw,
    serving,
    welcome,
    ws_connect,
    ws_connect_small_buffer,
)
from .test_limits import still_serving

pytestmark = pytest.mark.anyio

UNLIMITED = Config(
    rate_burst=10**6, rate_per_second=1e6, request_burst=10**6, request_per_second=1e6
)
MEMBERS = 5  # a fault is planted in the middle one's socket: members on both sides of it
MIDDLE = "m2"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- the C-level loop alone, on socket pairs ------------------------------------------------


def test_every_socket_is_written_once_whatever_the_ones_before_it_raised() -> None:
    pairs = [socket.socketpair() for _ in range(4)]
    ok1, full, reset, ok2 = pairs
    full[0].setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while True:
            full[0].send(b"x" * 65536)
    reset[1].close()
    try:
        results = _write_all(
            [ok1[0].fileno(), full[0].fileno(), reset[0].fileno(), ok2[0].fileno()], b"frame"
        )
        assert results[0] == results[3] == 5
        assert isinstance(results[1], BlockingIOError)
        assert isinstance(results[2], BrokenPipeError)
        for ours, theirs in (ok1, ok2):
            ours.close()
            assert theirs.recv(100) == b"frame"
            assert theirs.recv(100) == b""  # once
    finally:
        for pair in pairs:
            for sock in pair:
                sock.close()


# -- a room on a real server ---------------------------------------------------------------


@asynccontextmanager
async def room(srv: Running, **kwargs: Any) -> AsyncIterator[tuple[Any, list[Any]]]:
    """A sender and ``MEMBERS`` members of room ``lobby``, welcomed, and one message
    through (after it every member's socket takes a fan-out straight away)."""
    async with AsyncExitStack() as stack:
        sender = await stack.enter_async_context(
            ws_connect(f"{srv.ws}?user=sender&room=lobby", **JSON)
        )
        await welcome(sender)
        members = []
        for i in range(MEMBERS):
            member = await stack.enter_async_context(
                ws_connect(f"{srv.ws}?user=m{i}&room=lobby", **kwargs, **JSON)
            )
            await welcome(member)
            members.append(member)
        await say(sender, "warm-up")
        for member in members:
            await heard(member, "warm-up")
        yield sender, members


async def say(sender: Any, text: str) -> None:
    """Send ``text`` to ``lobby`` and wait for its ack (each message its own flush)."""
    ref = text[:16]  # (unique in every test here)
    await sender.send(json.dumps({"type": "send", "room": "lobby", "text": text, "id": ref}))
    await recv_until(sender, lambda e: e.get("type") == "ack" and e.get("id") == ref)


async def heard(member: Any, last: str) -> list[str]:
    """The texts of the messages ``member`` got, up to ``last``."""
    events = await recv_until(member, lambda e: e.get("type") == "message" and e["text"] == last)
    return [e["text"] for e in events if e.get("type") == "message"]


def socket_of(srv: Running, user: str) -> int:
    """The server's descriptor for ``user``'s connection."""
    (fd,) = [p.transport_fd for p in srv.server._peers.values() if p.user == user]
    assert fd >= 0
    return fd


@contextmanager
def planted(
    monkeypatch: pytest.MonkeyPatch,
    fd: int,
    marker: bytes,
    fault: Callable[[Callable[[int, Any], int], int, bytes], int],
) -> Iterator[list[str]]:
    """``fault`` replaces the first write to ``fd`` of a frame holding ``marker``;
    yields the names of the functions that met it."""
    write = os.write
    met: list[str] = []

    def faulty(to: int, data: Any) -> int:
        if to == fd and marker in bytes(data) and not met:
            met.append(sys._getframe(1).f_code.co_name)
            return fault(write, to, bytes(data))
        return write(to, data)

    with monkeypatch.context() as patch:
        patch.setattr(os, "write", faulty)
        yield met


def full(write: Callable[[int, Any], int], fd: int, data: bytes) -> int:
    raise BlockingIOError(errno.EAGAIN, "planted: the socket's buffer is full")


def half(write: Callable[[int, Any], int], fd: int, data: bytes) -> int:
    return write(fd, data[: len(data) // 2])


def reset(write: Callable[[int, Any], int], fd: int, data: bytes) -> int:
    # A real EPIPE: the socket stops taking bytes, for this write and every later one.
    with socket.socket(fileno=os.dup(fd)) as sock:
        sock.shutdown(socket.SHUT_WR)
    return write(fd, data)


TEXTS = [f"msg-{i}" for i in range(6)]


async def test_a_member_whose_socket_is_full_mid_fan_out_gets_it_later_the_others_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with serving(config=UNLIMITED) as srv, room(srv) as (sender, members):
        with planted(monkeypatch, socket_of(srv, MIDDLE), b"msg-2", full) as met:
            for text in TEXTS:
                await say(sender, text)
        assert met == ["_write_all"]
        for member in members:
            assert await heard(member, TEXTS[-1]) == TEXTS  # each once, in order


async def test_a_member_that_just_sent_is_written_with_the_others_and_its_trouble_is_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Its ack was queued to it (it was set aside for that flush): the next fan-out
    # finds it among the peers the C-level loop writes to.
    async with serving(config=UNLIMITED) as srv, room(srv) as (sender, members):
        middle = members[int(MIDDLE[1:])]
        await say(middle, "mine")
        with planted(monkeypatch, socket_of(srv, MIDDLE), b"theirs", full) as met:
            await say(sender, "theirs")
        assert met == ["_write_all"]
        for member in members:
            expected = ["theirs"] if member is middle else ["mine", "theirs"]
            assert await heard(member, "theirs") == expected


async def test_a_member_whose_socket_takes_part_of_a_frame_gets_the_rest_in_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with serving(config=UNLIMITED) as srv, room(srv) as (sender, members):
        with planted(monkeypatch, socket_of(srv, MIDDLE), b"msg-1", half) as met:
            for text in TEXTS:
                await say(sender, text)
        assert met == ["_write_all"]
        for member in members:
            assert await heard(member, TEXTS[-1]) == TEXTS


async def test_a_member_whose_socket_is_reset_mid_fan_out_is_dropped_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with serving(config=UNLIMITED) as srv, room(srv) as (sender, members):
        victim = members.pop(int(MIDDLE[1:]))
        with planted(monkeypatch, socket_of(srv, MIDDLE), b"msg-2", reset) as met:
            for text in TEXTS:
                await say(sender, text)
        assert met == ["_write_all"]
        for member in members:
            assert await heard(member, TEXTS[-1]) == TEXTS
        assert (await ended(victim)).rcvd is None  # no close frame: its socket was gone
        with anyio.fail_after(GUARD):
            while srv.server.connections > 1 + len(members):
                await anyio.sleep(0.01)
        await still_serving(srv)


async def test_a_member_that_stops_reading_gets_everything_later_the_others_as_it_comes() -> None:
    # A real full socket: the middle member reads nothing while the room talks (its
    # kernel buffers hold a few KB), then reads it all. Halfway it asks something that
    # is refused, in the same loop iteration as a message comes: its error goes out
    # after what waited for it and before that message, however later ones are written.
    total, size = 40, 16_000
    texts = [f"{i:03d}:" + "x" * size for i in range(total)]
    async with serving(config=UNLIMITED) as srv, AsyncExitStack() as stack:
        sender = await stack.enter_async_context(
            ws_connect(f"{srv.ws}?user=sender&room=lobby", **JSON)
        )
        await welcome(sender)
        members = []
        for i in range(MEMBERS):
            connect = (
                ws_connect_small_buffer(
                    f"{srv.ws}?user=m{i}&room=lobby", 4096, max_queue=None, **JSON
                )
                if f"m{i}" == MIDDLE
                else ws_connect(f"{srv.ws}?user=m{i}&room=lobby", max_queue=None, **JSON)
            )
            members.append(await stack.enter_async_context(connect))
            await welcome(members[-1])
        stalled = members[int(MIDDLE[1:])]
        stalled.transport.pause_reading()
        await say(sender, "warm-up")
        for i, text in enumerate(texts):
            if i == total // 2:
                refused = {"type": "send", "room": "nowhere", "text": "?", "id": "refused"}
                await send_raw(stalled, masked_frame(1, json.dumps(refused).encode()))
                message = {**send_to_lobby(text), "id": text[:16]}
                await send_raw(sender, masked_frame(1, json.dumps(message).encode()))
                await recv_until(sender, lambda e, ref=text[:16]: e.get("id") == ref)
            else:
                await say(sender, text)
            for member in members:
                if member is not stalled:
                    assert (await heard(member, text))[-1] == text
        stalled.transport.resume_reading()
        got = await recv_until(stalled, lambda e: e.get("text") == texts[-1])
        seen = [e["text"] if e["type"] == "message" else e["type"] for e in got]
        seen = [x for x in seen if x not in ("joined", "presence")]
        assert seen == ["warm-up", *texts[: total // 2], "error", *texts[total // 2 :]]


async def test_messages_sent_in_one_write_reach_every_member_in_the_order_sent() -> None:
    # One read, two messages: the first fan-out goes into the members' queues when the
    # second comes, and the second (held for the flush) must go out after it.
    async with serving(config=UNLIMITED) as srv, room(srv) as (sender, members):
        frames = [
            masked_frame(1, json.dumps({"type": "send", "room": "lobby", "text": t}).encode())
            for t in TEXTS
        ]
        await send_raw(sender, b"".join(frames))
        for member in members:
            assert await heard(member, TEXTS[-1]) == TEXTS


async def test_a_socket_number_taken_over_by_a_new_connection_gets_nothing_meant_for_the_old() -> (
    None
):
    # The host may name a connection that closed meanwhile (its id is skipped): the
    # number of its socket may belong to another connection by then.
    async with serving(config=UNLIMITED) as srv, room(srv) as (sender, members):
        gone = members.pop(int(MIDDLE[1:]))
        (gone_id,) = [c for c, p in srv.server._peers.items() if p.user == MIDDLE]
        gone_fd = socket_of(srv, MIDDLE)
        await kill(gone)
        with anyio.fail_after(GUARD):
            while gone_id in srv.server._peers or srv.server._tcp > 1 + len(members):
                await anyio.sleep(0.01)
        async with ws_connect(f"{srv.ws}?user=newcomer&room=lobby", **JSON) as newcomer:
            await welcome(newcomer)
            assert socket_of(srv, "newcomer") == gone_fd, "the number was not taken over"
            to = tuple(c for c, p in srv.server._peers.items() if p.user.startswith("m"))
            srv.server.deliver((*to[:2], gone_id, *to[2:]), json.dumps({"type": "stray"}))
            srv.server._flush()
            for member in members:
                await recv_until(member, lambda e: e.get("type") == "stray")
            await say(sender, "next")
            got = await recv_until(newcomer, lambda e: e.get("type") in ("message", "stray"))
            assert got[-1].get("text") == "next", got[-1]


def frame_size(text: str) -> int:
    """Bytes of the unmasked server frame that carries ``text``."""
    n = len(text.encode())
    return n + (2 if n < 126 else 4 if n < 65536 else 10)


async def test_the_bytes_written_count_every_byte_each_member_and_the_sender_got() -> None:
    config = replace(UNLIMITED, ping_interval=1e6)
    async with (
        serving(config=config) as srv,
        room(srv, ping_interval=None) as (sender, members),
    ):
        before = srv.server.transport_tally().bytes_written
        got = 0
        for text in TEXTS:
            await sender.send(json.dumps({"type": "send", "room": "lobby", "text": text}))
            with anyio.fail_after(GUARD):
                got += frame_size(await sender.recv())  # its ack
                for member in members:
                    got += frame_size(await member.recv())
        assert srv.server.transport_tally().bytes_written - before == got


async def test_a_reply_queued_to_a_member_goes_out_before_a_fan_out_that_follows_it() -> None:
    # One read each, in one loop iteration: a member's refused request (its error is
    # queued to it) and then the sender's message (its fan-out held for the flush,
    # which must not write it straight to that member, past the error).
    async with serving(config=UNLIMITED) as srv, room(srv) as (sender, members):
        asker = members[int(MIDDLE[1:])]
        refused = {"type": "send", "room": "nowhere", "text": "?", "id": "refused"}
        await send_raw(asker, masked_frame(1, json.dumps(refused).encode()))
        await send_raw(sender, masked_frame(1, json.dumps(send_to_lobby("after")).encode()))
        got = await recv_until(asker, lambda e: e.get("text") == "after")
        assert [e["type"] for e in got] == ["error", "message"], got
        for member in members:
            if member is not asker:
                assert await heard(member, "after") == ["after"]


def send_to_lobby(text: str) -> dict[str, str]:
    return {"type": "send", "room": "lobby", "text": text}
