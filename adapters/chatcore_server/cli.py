"""``chatcore serve``: the standalone chat server from the command line."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import ssl
import sys
from collections.abc import Sequence
from typing import Any

import anyio
from anyio.abc import TaskStatus

from chatcore import Config
from chatcore_host import parse_origin
from chatcore_store import DEFAULT_URL, HistoryStore, open_store
from chatcore_store.cli import add_subcommands

from ._server import ChatServer

__all__ = ["main"]

log = logging.getLogger("chatcore_server")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatcore",
        description="chatcore: a real-time chat server (WebSocket + browser client).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the chat server",
        description="Run the chat server. Open the printed URL in a browser to chat; "
        "programs connect to ws://HOST:PORT/ws?user=NAME&room=ROOM.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port)")
    serve.add_argument(
        "--db",
        default=DEFAULT_URL,
        help="where history is kept: sqlite:///FILE (relative to here), sqlite:////ABS/PATH, "
        "postgresql://USER@HOST/DB (asyncio backend only), or 'memory' (lost on exit)",
    )
    serve.add_argument(
        "--grace",
        type=float,
        default=Config().grace_period,
        help="seconds a dropped client has to reconnect and resume before it leaves its rooms",
    )
    serve.add_argument("--certfile", help="TLS certificate (PEM): serve https:// and wss://")
    serve.add_argument("--keyfile", help="TLS private key (PEM) for --certfile")
    serve.add_argument(
        "--jwt-secret",
        help="require an HS256 JWT (?token= or Authorization: Bearer) whose 'sub' is the "
        "user name; without it the 'user' parameter is trusted",
    )
    serve.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        type=_origin,
        metavar="ORIGIN",
        help="a browser origin (http[s]://HOST[:PORT]) whose pages may connect besides "
        "the server's own pages, whose scheme, host and port must match exactly (another "
        "port or localhost is another origin); needed behind a proxy that terminates TLS. "
        "Repeatable; '*' allows any",
    )
    serve.add_argument(
        "--ice-server",
        action="append",
        default=[],
        type=_ice_server,
        metavar="URL[,USER,CREDENTIAL]",
        help="a STUN or TURN server the browser page uses for calls (stun:HOST:PORT; "
        "turn:HOST:PORT?transport=udp,USER,CREDENTIAL). Repeatable. None is needed on "
        "one machine or a LAN; across the internet give a STUN server, and a TURN server "
        "for users behind symmetric NAT",
    )
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="logging threshold (info: one line per connection opened and closed)",
    )
    serve.add_argument(
        "--backend", default="asyncio", choices=["asyncio", "trio"], help="anyio event loop"
    )
    serve.set_defaults(func=_serve_command)
    add_subcommands(commands)
    return parser


def _origin(value: str) -> str:
    if value != "*" and parse_origin(value) is None:
        raise argparse.ArgumentTypeError(f"not an origin: {value!r} (http[s]://HOST[:PORT], or *)")
    return value


_ICE_SCHEMES = ("stun:", "stuns:", "turn:", "turns:")


def _ice_server(value: str) -> dict[str, Any]:
    """``URL`` or ``URL,USER,CREDENTIAL`` as an ``RTCIceServer`` for the page."""
    url, *secret = value.split(",")
    if not url.startswith(_ICE_SCHEMES) or len(url) <= len("stun:"):
        raise argparse.ArgumentTypeError(f"not a stun: or turn: URL: {url!r}")
    server: dict[str, Any] = {"urls": [url]}
    if len(secret) == 2:
        server["username"], server["credential"] = secret
    elif secret or url.startswith(("turn:", "turns:")):
        raise argparse.ArgumentTypeError(
            f"{value!r}: a TURN server takes URL,USER,CREDENTIAL; a STUN server only its URL"
        )
    return server


def _store(url: str) -> HistoryStore:
    try:
        return open_store(url)
    except ValueError as exc:
        raise SystemExit(f"--db: {exc}") from None


def _ssl(certfile: str | None, keyfile: str | None) -> ssl.SSLContext | None:
    if certfile is None:
        if keyfile is not None:
            raise SystemExit("--keyfile needs --certfile")
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile, keyfile)
    return context


async def _serve(server: ChatServer) -> None:
    async with anyio.create_task_group() as tg:

        async def stop_on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.info("%s: shutting down", signal.Signals(signum).name)
                    server.shutdown()
                    return

        async def run(*, task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED) -> None:
            await server.serve(task_status=task_status)
            tg.cancel_scope.cancel()

        tg.start_soon(stop_on_signal)
        url = await tg.start(run)
        ws_url = url.replace("http", "ws", 1)
        print(f"chatcore is running: open {url} in a browser", flush=True)
        print(f"programs connect to {ws_url}ws?user=NAME&room=general", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    code: int = args.func(args)
    return code


def _serve_command(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = Config(grace_period=args.grace)
    except ValueError as exc:
        raise SystemExit(f"--grace: {exc}") from None
    server = ChatServer(
        config=config,
        store=_store(args.db),
        host=args.host,
        port=args.port,
        ssl_context=_ssl(args.certfile, args.keyfile),
        jwt_secret=args.jwt_secret,
        allow_origins=args.allow_origin,
        ice_servers=args.ice_server,
    )
    failed: list[BaseException] = []
    try:
        with contextlib.suppress(KeyboardInterrupt):
            anyio.run(_serve, server, backend=args.backend)
    except* OSError as group:  # the listener could not start (port in use, bad address)
        failed.extend(group.exceptions)
    for error in failed:
        print(f"chatcore: cannot listen on {args.host}:{args.port}: {error}", file=sys.stderr)
    return 1 if failed else 0
