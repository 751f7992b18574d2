"""Run an ASGI app under uvicorn or hypercorn inside the test's event loop.

``serve(kind, app, **options)`` is an async context manager giving the app's
``http://127.0.0.1:PORT``: the server runs as a task of the test (so a test
can look at the ``ChatApp`` it serves) on a real loopback socket, and shuts
down when the block ends. uvicorn runs its ``websockets-sansio``
implementation, the one the conformance launcher pins (its ``send`` waits
while the transport is paused: the backpressure ChatApp relies on).
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # uvicorn and hypercorn's asyncio worker


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def listening_socket(send_buffer: int) -> socket.socket:
    """A loopback socket listening on a free port; its connections inherit ``SO_SNDBUF``.

    Set before ``listen``, the buffer is fixed (Linux keeps twice the value) instead of
    autotuned to megabytes on loopback: what ``uvicorn --fd`` and ``hypercorn --bind
    fd://`` serve from, and what ``chatcore serve`` asks of each socket (64 KiB).
    """
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


@asynccontextmanager
async def serve(
    kind: str, app: Any, *, send_buffer: int | None = None, **options: Any
) -> AsyncIterator[str]:
    """``app`` served by ``kind`` (``uvicorn`` or ``hypercorn``) on a free loopback port.

    With ``send_buffer``, the server listens on a socket made here with that
    ``SO_SNDBUF`` (see :func:`listening_socket`).
    """
    listener = None if send_buffer is None else listening_socket(send_buffer)
    port = free_port() if listener is None else listener.getsockname()[1]
    async with anyio.create_task_group() as tasks:
        if kind == "uvicorn":
            import uvicorn

            config = uvicorn.Config(
                app,
                host="127.0.0.1",
                port=port,
                ws="websockets-sansio",
                log_level="warning",
                lifespan=options.pop("lifespan", "auto"),
                **options,
            )
            server = uvicorn.Server(config)
            server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
            sockets = None if listener is None else [listener]
            tasks.start_soon(lambda: server.serve(sockets=sockets))
            with anyio.fail_after(10):
                while not server.started:
                    await anyio.sleep(0.02)
            try:
                yield f"http://127.0.0.1:{port}"
            finally:
                server.should_exit = True
        else:
            from hypercorn.asyncio import serve as hypercorn_serve
            from hypercorn.config import Config

            config = Config()
            # hypercorn owns a socket it is given by number: it closes it when done.
            config.bind = [f"127.0.0.1:{port}" if listener is None else f"fd://{listener.detach()}"]
            config.loglevel = "WARNING"
            for key, value in options.items():
                setattr(config, key, value)
            stop = anyio.Event()

            async def run() -> None:
                await hypercorn_serve(app, config, shutdown_trigger=stop.wait)

            tasks.start_soon(run)
            with anyio.fail_after(10):
                while True:
                    try:
                        with socket.create_connection(("127.0.0.1", port), timeout=1):
                            break
                    except OSError:
                        await anyio.sleep(0.02)
            try:
                yield f"http://127.0.0.1:{port}"
            finally:
                stop.set()
