"""Embed the chat server in your own program: a few lines, then open the URL.

    python examples/server.py            # http://127.0.0.1:8000/

History is kept in memory here; pass ``store=open_store("sqlite:///chat.db")``
to keep it. The server stops gracefully on Ctrl-C.
"""

import signal

import anyio

from chatcore import Config
from chatcore_server import ChatServer


async def main() -> None:
    server = ChatServer(config=Config(grace_period=30), port=8000)
    async with anyio.create_task_group() as tg:
        url = await tg.start(server.serve)
        print(f"chat at {url}")
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                server.shutdown()  # every client gets 1001, then serve() returns
                break


if __name__ == "__main__":
    anyio.run(main)
