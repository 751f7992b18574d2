"""One WebSocket connection behind an ASGI server: its queue and its writer.

ASGI gives an application one signal of backpressure: ``await send(...)``
does not return while the server's buffer for that client is full. So each
connection gets a :class:`Link`: the engine's frames are queued here (the
host's ``deliver`` must not block), one writer task awaits ``send`` for each,
and only what ``send`` took is reported back to the engine (``Written``, or
``Drained`` when the queue is empty). The engine's outbox bound
(``Config.outbox_frames``/``outbox_bytes``) counts what is queued here, so
this queue never holds more than the outbox allows: a reader that stops
reading fills it, the engine closes the connection with 1013, and the queue
is dropped with the connection.

No chat rules here, and no engine: the writer reports through the callbacks
its :class:`~chatcore_asgi.ChatApp` gives it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import suppress
from typing import Any, Protocol

import anyio

__all__ = ["Link", "Message", "Send", "Wake", "wake_maker"]

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]


class Wake(Protocol):
    """A one-shot signal: one task waits, anyone sets it (``anyio.Event``'s shape)."""

    def set(self) -> None: ...

    def wait(self) -> Awaitable[Any]: ...


class _FutureWake:
    """A one-shot :class:`Wake` on asyncio: one bare future.

    A writer sleeps and wakes once per frame when its client is idle, so the
    wake is on the per-delivery path: ``anyio.Event()`` costs a backend look-up
    (the current task, via sniffio), an ``asyncio.Event`` and its loop binding
    under a lock, then a future per wait; this is the future alone. Cancelling
    the waiting task cancels the future, which ``set`` then leaves alone.
    """

    __slots__ = ("_future",)

    def __init__(self, future: asyncio.Future[None]) -> None:
        self._future = future

    def set(self) -> None:
        if not self._future.done():
            self._future.set_result(None)

    def wait(self) -> Awaitable[None]:
        return self._future


def wake_maker() -> Callable[[], Wake]:
    """How to make a :class:`Wake` in the running event loop (call it inside the loop).

    On asyncio (uvicorn; hypercorn's default worker) a bare future; on any
    other backend (hypercorn's trio worker) ``anyio.Event``.
    """
    try:
        on_asyncio = asyncio.current_task() is not None
    except RuntimeError:  # no asyncio loop running: another backend
        on_asyncio = False
    if on_asyncio:
        create_future = asyncio.get_running_loop().create_future
        return lambda: _FutureWake(create_future())
    return anyio.Event


class Link:
    """The queue and writer of one accepted WebSocket connection."""

    __slots__ = (
        "conn",
        "user",
        "_send",
        "queue",
        "_wake",
        "close_with",
        "closed",
        "sending_since",
        "ping_waiting",
        "_close_timeout",
        "_deadline",
        "_scope",
        "_new_wake",
        "__weakref__",
    )

    def __init__(
        self,
        conn: int,
        user: str,
        send: Send,
        *,
        close_timeout: float,
        new_wake: Callable[[], Wake] = anyio.Event,
    ) -> None:
        self.conn = conn
        self.user = user
        self._send = send
        self.queue: deque[str] = deque()
        self._new_wake = new_wake
        self._wake: Wake | None = None
        self.close_with: tuple[int, str] | None = None
        """Set once the connection is to close: (code, reason) after the queue."""
        self.closed = False
        """The close frame was sent (or the client is gone): nothing more goes out."""
        self.sending_since: float | None = None
        """``time.monotonic()`` when the ``send`` in progress began; None when none is."""
        self.ping_waiting = False
        """The engine asked for a ping while a send was blocked (see ChatApp.ping)."""
        self._close_timeout = close_timeout
        self._deadline = 0.0  # anyio time by which the close goes out, queue or not
        self._scope: anyio.CancelScope | None = None  # the writes in progress

    def push(self, text: str) -> None:
        """Queue one frame (from the host's turn: never blocks)."""
        if self.close_with is None:
            self.queue.append(text)
            self.wake()

    def close(self, code: int, reason: str) -> None:
        """Close after what is queued."""
        if self.close_with is None:
            self.close_with = (code, reason)
            self._deadline = anyio.current_time() + self._close_timeout
            if self._scope is not None and self.sending_since is not None:
                # A writer waiting on a reader that takes nothing: what is queued is
                # given up (a resume replays it), so the close frame goes next.
                self._scope.cancel()
                self.queue.clear()
            self.wake()

    def wake(self) -> None:
        if (wake := self._wake) is not None:
            self._wake = None
            wake.set()

    async def write_loop(self, written: Callable[[Link, int, int, bool], None]) -> None:
        """Send what is queued, report it, and the close frame last.

        ``written(link, frames, nbytes, drained)`` follows each batch: what
        ``send`` took (frames, and the UTF-8 bytes of their text), and whether
        the queue was empty then. A close that comes while a send waits gives
        up the queue; otherwise the queue goes first.
        Either way the close frame must be taken within ``close_timeout``, or
        the connection ends without it (the server then drops the client).
        """
        queue = self.queue
        new_wake = self._new_wake
        # One scope for the link's whole life until the close (not one per batch: a
        # scope costs more than the sends of a small batch); ``close`` cancels it.
        with anyio.CancelScope() as scope:
            self._scope = scope
            while self.close_with is None:
                if queue:
                    await self._write_all(written)
                else:
                    wake = self._wake = new_wake()
                    await wake.wait()
        self._scope = None
        with anyio.CancelScope(deadline=self._deadline):
            await self._write_all(written)
            await self._send_close()
        self.closed = True

    async def _write_all(self, written: Callable[[Link, int, int, bool], None]) -> None:
        queue = self.queue
        send = self._send
        while queue:
            # Take the batch there is now; report it once, so that a busy
            # connection costs one engine call per batch, not per frame.
            frames = nbytes = 0
            count = len(queue)
            self.sending_since = time.monotonic()
            try:
                for _ in range(count):
                    text = queue[0]
                    await send({"type": "websocket.send", "text": text})
                    queue.popleft()
                    frames += 1
                    # Its UTF-8 size; isascii() is O(1), and chat frames mostly are.
                    nbytes += len(text) if text.isascii() else len(text.encode())
            finally:
                self.sending_since = None
                if frames:
                    written(self, frames, nbytes, not queue)

    async def _send_close(self) -> None:
        """The close frame, once the server takes it (the caller bounds the wait)."""
        self.queue.clear()
        if self.closed:
            return
        code, reason = self.close_with or (1000, "")
        with suppress(Exception):  # the client is gone already: nothing to tell it
            await send_close(self._send, code, reason)
        self.closed = True


async def send_close(send: Send, code: int, reason: str) -> None:
    await send({"type": "websocket.close", "code": code, "reason": reason})
