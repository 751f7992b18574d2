"""A connection's writer, fed in memory: what it reports is what ``send`` took.

Invariant: at every moment the frames and UTF-8 bytes reported to the engine are
exactly those of the frames ``send`` has returned from, in queue order, none
lost or repeated; the last report of an emptied queue says so (drained). The
engine's outbox bound rests on it: a report ahead of ``send`` lets a reader
that stopped reading hold more than the bound; one short of it closes a reader
that keeps up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import pytest

from chatcore_asgi._link import Link, Message, Wake, wake_maker

pytestmark = pytest.mark.anyio

TEXTS = ["a", "héllo wörld", "x" * 300, "日本語のテキスト", "b", "c"]


class GatedSend:
    """An ASGI ``send`` that takes frames until ``open`` frames were taken, then waits."""

    def __init__(self, open_: int) -> None:
        self.taken: list[str] = []
        self.open = open_
        self.gate = anyio.Event()
        self.waiting = anyio.Event()

    async def __call__(self, message: Message) -> None:
        if message["type"] == "websocket.send":
            if len(self.taken) >= self.open:
                self.waiting.set()
                await self.gate.wait()
            self.taken.append(message["text"])


def _utf8(texts: list[str]) -> int:
    return sum(len(t.encode()) for t in texts)


@pytest.fixture(params=["future", "anyio.Event"])
def new_wake(request: pytest.FixtureRequest) -> Callable[[], Callable[[], Wake]]:
    """The writer's wake on asyncio (a bare future) and the generic one (anyio.Event)."""
    if request.param == "future":
        return wake_maker
    return lambda: anyio.Event


async def test_reports_follow_sends_and_the_drained_queue(
    new_wake: Callable[[], Callable[[], Wake]],
) -> None:
    send = GatedSend(open_=2)
    link = Link(1, "u", send, close_timeout=1.0, new_wake=new_wake())
    reports: list[tuple[int, int, bool]] = []

    def written(_: Link, frames: int, nbytes: int, drained: bool) -> None:
        reports.append((frames, nbytes, drained))
        # Never ahead of what send took, and byte for byte what it took.
        assert sum(r[0] for r in reports) <= len(send.taken)
        assert sum(r[1] for r in reports) == _utf8(send.taken[: sum(r[0] for r in reports)])

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(link.write_loop, written)
        for text in TEXTS[:4]:
            link.push(text)
        await send.waiting.wait()  # two taken, the third waits in send
        assert sum(r[0] for r in reports) <= 2
        link.push(TEXTS[4])  # queued behind the blocked send
        send.gate.set()
        with anyio.fail_after(5):
            while not reports or not reports[-1][2]:
                await anyio.sleep(0.01)
        link.push(TEXTS[5])  # the writer sleeps now: this wakes it
        with anyio.fail_after(5):
            while sum(r[0] for r in reports) < len(TEXTS):
                await anyio.sleep(0.01)
        link.close(1000, "")
    assert send.taken == TEXTS
    assert sum(r[0] for r in reports) == len(TEXTS)
    assert sum(r[1] for r in reports) == _utf8(TEXTS)
    assert reports[-1][2]
    assert link.closed


async def test_a_close_while_send_waits_gives_up_the_queue_and_reports_only_what_went(
    new_wake: Callable[[], Callable[[], Wake]],
) -> None:
    send = GatedSend(open_=1)
    closes: list[dict[str, Any]] = []

    async def recording(message: Message) -> None:
        if message["type"] == "websocket.close":
            closes.append(dict(message))
            return
        await send(message)

    link = Link(1, "u", recording, close_timeout=1.0, new_wake=new_wake())
    reports: list[tuple[int, int, bool]] = []
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(link.write_loop, lambda _, f, b, d: reports.append((f, b, d)))
        for text in TEXTS:
            link.push(text)
        await send.waiting.wait()
        link.close(1013, "too slow")
    assert send.taken == TEXTS[:1]
    assert sum(r[0] for r in reports) == 1
    assert sum(r[1] for r in reports) == _utf8(TEXTS[:1])
    assert closes == [{"type": "websocket.close", "code": 1013, "reason": "too slow"}]
    assert not link.queue
