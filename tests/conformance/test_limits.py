"""Limits and their answers (protocol.md sections 1 and 5): close codes, ``rate_limited``, caps.

Each breach ends in a documented error or close for the offending connection
alone: a bystander in the same room carries on.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import anyio
import pytest
from websockets.asyncio.client import ClientConnection

from .conftest import Server
from .wire import (
    close_code,
    is_type,
    masked_frame,
    recv,
    recv_until,
    say,
    send,
    send_raw,
    unique,
    welcome,
    ws_open,
)

pytestmark = pytest.mark.anyio

KIB = 1024


async def _too_big(conn: ClientConnection) -> None:
    await conn.send("x" * (80 * KIB + 1))


async def _too_many_fragments(conn: ClientConnection) -> None:
    send_raw(conn, _fragmented(["x"] * 65))  # one message in 65 frames


def _fragmented(pieces: list[str]) -> bytes:
    """One text message in ``len(pieces)`` frames (``websockets`` would add an empty one)."""
    last = len(pieces) - 1
    return b"".join(
        masked_frame(0x1 if i == 0 else 0x0, piece.encode(), fin=i == last)
        for i, piece in enumerate(pieces)
    )


async def _invalid_utf8(conn: ClientConnection) -> None:
    send_raw(conn, masked_frame(0x1, b'{"type":"send","text":"\xff\xfe"}'))


async def _binary(conn: ClientConnection) -> None:
    await conn.send(b'{"type":"join","room":"general"}')


HOSTILE: dict[str, tuple[Callable[[ClientConnection], Awaitable[None]], int]] = {
    "over-80-KiB": (_too_big, 1009),
    "over-64-fragments": (_too_many_fragments, 1009),
    "invalid-utf8": (_invalid_utf8, 1007),
    "binary": (_binary, 1003),
}


@pytest.mark.parametrize("case", list(HOSTILE))
async def test_a_bad_frame_closes_that_connection_alone(server: Server, case: str) -> None:
    act, code = HOSTILE[case]
    alice, bob, room = unique("alice"), unique("bob"), unique("room")
    async with (
        ws_open(server.ws(f"user={bob}&room={room}")) as bystander,
        ws_open(server.ws(f"user={alice}&room={room}")) as hostile,
    ):
        await welcome(bystander)
        await welcome(hostile)
        await act(hostile)
        assert await close_code(hostile) == code
        assert await say(bystander, room, "still fine") > 0


@pytest.mark.parametrize(("over", "code"), [(0, None), (1, 1009)], ids=["80-KiB", "one-more"])
async def test_80_kib_in_64_fragments_is_the_bound(
    server: Server, over: int, code: int | None
) -> None:
    """64 frames whose payloads and continuation headers make 80 KiB are one message
    (its text is over 64 KiB: error ``too_large``, no close); a byte more is 1009."""
    alice, room = unique("alice"), unique("room")
    async with ws_open(server.ws(f"user={alice}&room={room}")) as conn:
        await welcome(conn)
        head = f'{{"type":"send","room":"{room}","id":"edge","text":"'
        tail = '"}'
        piece = 100  # under 126 bytes: each continuation header is 2 + 4 (mask) bytes
        payload = 80 * KIB - 63 * 6 + over
        body = "x" * (payload - len(head) - len(tail) - 63 * piece)
        pieces = [head + body, *["x" * piece] * 62, "x" * piece + tail]
        assert len(pieces) == 64
        assert sum(len(p) for p in pieces) + 63 * 6 == 80 * KIB + over
        send_raw(conn, _fragmented(pieces))
        if code is not None:
            assert await close_code(conn) == code
            return
        error = (await recv_until(conn, is_type("error")))[-1]
        assert (error["code"], error["ref"]) == ("too_large", "edge")
        assert await say(conn, room, "still open") > 0


async def test_a_17th_session_of_one_user_is_closed_1008(server: Server) -> None:
    alice, room = unique("alice"), unique("room")
    async with AsyncExitStack() as stack:
        tabs = [
            await stack.enter_async_context(ws_open(server.ws(f"user={alice}&room={room}")))
            for _ in range(16)
        ]
        for tab in tabs:
            assert (await welcome(tab))["user"] == alice
        async with ws_open(server.ws(f"user={alice}&room={room}")) as extra:
            assert await close_code(extra) == 1008
        assert await say(tabs[0], room, "the others stay") > 0
        # Another user is not affected by alice's count.
        async with ws_open(server.ws(f"user={unique('bob')}&room={room}")) as other:
            assert (await welcome(other))["resumed"] is False


async def _flood_replies(conn: ClientConnection, frames: list[str]) -> list[Any]:
    """Send ``frames`` at once; the replies to them (errors and acks), in order."""
    for frame in frames:
        await conn.send(frame)
    replies: list[Any] = []
    while len(replies) < len(frames):
        event = await recv(conn)
        if event["type"] in ("ack", "error"):
            replies.append(event)
    return replies


async def test_messages_past_the_burst_are_rate_limited_and_dropped(server: Server) -> None:
    alice, bob, room = unique("alice"), unique("bob"), unique("room")
    async with (
        ws_open(server.ws(f"user={alice}&room={room}")) as a,
        ws_open(server.ws(f"user={bob}&room={room}")) as b,
    ):
        await welcome(a)
        await welcome(b)
        frames = [
            f'{{"type":"send","room":"{room}","text":"m{n}","id":"rl-{n}"}}' for n in range(30)
        ]
        replies = await _flood_replies(a, frames)
        acked = [r["id"] for r in replies if r["type"] == "ack"]
        refused = [r for r in replies if r["type"] == "error"]
        assert len(acked) >= 10  # the burst
        assert refused, "30 messages at once: some must be over the rate"
        for error in refused:
            assert error["code"] == "rate_limited"
            assert error["ref"].startswith("rl-")
            assert isinstance(error["retry_after"], int | float)
            assert error["retry_after"] > 0
        assert sorted(acked + [e["ref"] for e in refused]) == sorted(f"rl-{n}" for n in range(30))
        # The connection goes on; a refused message was not sent to anyone.
        await anyio.sleep(max(e["retry_after"] for e in refused))
        await say(a, room, "after the pause", "rl-after")
        events = await recv_until(b, is_type("message", text="after the pause"))
        delivered = [e["id"] for e in events if e["type"] == "message"]
        assert delivered == [*acked, "rl-after"]


@pytest.mark.parametrize(
    ("frame", "ref"),
    [
        ('{{"type":"send","room":"{room}","text":"no id"}}', "{room}"),
        ('{{"type":"dm","to":"{bob}","text":"no id"}}', "{dm}"),
    ],
    ids=["send", "dm"],
)
async def test_rate_limited_without_id_names_the_room(server: Server, frame: str, ref: str) -> None:
    alice, bob, room = unique("alice"), unique("bob"), unique("room")
    names = {"room": room, "bob": bob, "dm": "dm:" + ":".join(sorted([alice, bob]))}
    async with ws_open(server.ws(f"user={alice}&room={room}")) as a:
        await welcome(a)
        replies = await _flood_replies(a, [frame.format(**names)] * 30)
        refused = [r for r in replies if r["type"] == "error"]
        assert refused
        assert {(r["code"], r["ref"]) for r in refused} == {("rate_limited", ref.format(**names))}


async def test_requests_past_their_burst_are_rate_limited_even_invalid_ones(
    server: Server,
) -> None:
    alice, room = unique("alice"), unique("room")
    async with ws_open(server.ws(f"user={alice}&room={room}")) as a:
        await welcome(a)
        replies = await _flood_replies(a, ["not json"] * 61 + ["[]"] * 59)
        codes = [r["code"] for r in replies]
        assert "rate_limited" in codes
        assert set(codes) == {"invalid_json", "rate_limited"}
        assert codes.count("invalid_json") >= 60  # the request burst
        assert all(r["ref"] is None for r in replies)  # these frames name nothing
        limited = [r for r in replies if r["code"] == "rate_limited"]
        await anyio.sleep(max(r["retry_after"] for r in limited))
        assert await say(a, room, "the connection goes on") > 0


async def test_typing_past_the_request_burst_names_the_room(server: Server) -> None:
    alice, room = unique("alice"), unique("room")
    async with ws_open(server.ws(f"user={alice}&room={room}")) as a:
        await welcome(a)
        for _ in range(120):
            await send(a, type="typing", room=room)
        errors = await recv_until(a, is_type("error"))
        assert (errors[-1]["code"], errors[-1]["ref"]) == ("rate_limited", room)


async def test_a_129th_room_is_refused_with_room_limit(server: Server) -> None:
    alice = unique("alice")
    rooms = [unique("r") for _ in range(128)]
    query = f"user={alice}&" + "&".join(f"room={r}" for r in rooms)
    async with ws_open(server.ws(query)) as a:
        hello = await welcome(a)
        assert set(hello["rooms"]) == set(rooms)
        extra = unique("r")
        await send(a, type="join", room=extra)
        error = (await recv_until(a, is_type("error")))[-1]
        assert (error["code"], error["ref"]) == ("room_limit", extra)
        await send(a, type="leave", room=rooms[0])
        await recv_until(a, is_type("left", room=rooms[0], user=alice))
        await send(a, type="join", room=extra)
        assert (await recv_until(a, is_type("members")))[-1]["room"] == extra
