"""Start chatcore's ASGI app for the benchmark: ``ChatApp`` (rate limits lifted, history
in memory) under uvicorn (its ``websockets-sansio`` implementation) or hypercorn.

    python -m benchmarks.asgi_launch --port 8765 --server uvicorn|hypercorn [--ws IMPL]

``--ws`` picks uvicorn's WebSocket implementation (default ``websockets-sansio``,
what ``ws="auto"`` picks when websockets is installed; python-socketio's peer uses
the same).
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from chatcore_asgi import ChatApp
from chatcore_store import MemoryStore

from .chatcore_launch import unlimited_config


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.asgi_launch")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--server", choices=["uvicorn", "hypercorn"], default="uvicorn")
    parser.add_argument(
        "--ws", choices=["websockets-sansio", "websockets", "wsproto"], default="websockets-sansio"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    app = ChatApp(config=unlimited_config(), store=MemoryStore())
    print(f"listening on {args.host}:{args.port}", flush=True)
    if args.server == "uvicorn":
        import uvicorn

        uvicorn.run(
            app,
            host=args.host,
            port=args.port,
            ws=args.ws,
            log_level="warning",
            access_log=False,
            ws_ping_interval=None,
        )
    else:
        from hypercorn.asyncio import serve
        from hypercorn.config import Config

        config = Config()
        config.bind = [f"{args.host}:{args.port}"]
        config.loglevel = "WARNING"
        asyncio.run(serve(app, config))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
