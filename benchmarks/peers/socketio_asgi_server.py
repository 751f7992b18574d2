"""Room broadcast with python-socketio's ``ASGIApp`` under uvicorn (``websockets-sansio``),
the same handlers as ``socketio_server`` (aiohttp): chatcore's ASGI peer."""

from __future__ import annotations

import os

os.environ["BENCH_SOCKETIO_MODE"] = "asgi"  # before socketio_server builds its server

import socketio  # type: ignore[import-untyped]
import uvicorn

from . import socketio_server
from ._common import parse_args


def main() -> None:
    args = parse_args("socketio_asgi_server")
    app = socketio.ASGIApp(socketio_server.sio)
    print(f"listening on {args.host}:{args.port}", flush=True)
    uvicorn.run(
        app, host=args.host, port=args.port, ws="websockets-sansio", log_level="warning",
        access_log=False, ws_ping_interval=None,
    )  # fmt: skip


if __name__ == "__main__":
    main()
