"""``chatcore serve``: the standalone chat server from the command line."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import signal
import ssl
import sys
import tomllib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import anyio
from anyio.abc import TaskStatus

from chatcore import Config, RecordError, replay
from chatcore_host import Bus, RecordFile, parse_origin, read_record
from chatcore_store import DEFAULT_URL, HistoryStore, open_store
from chatcore_store.cli import add_subcommands

from ._admin_cli import add_admin_subcommands, live_room_create, live_room_list, url_options
from ._logjson import JsonFormatter
from ._server import ChatServer, Limits

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
    serve.add_argument(
        "--redis",
        metavar="URL",
        help="join the other processes serving the same PostgreSQL --db through this Redis "
        "(redis://HOST:PORT/DB): messages, presence and sessions cross between them. Redis "
        "is only the bus; PostgreSQL stays the record. Needs a postgresql:// --db",
    )
    serve.add_argument(
        "--redis-prefix",
        metavar="PREFIX",
        help="start of every Redis channel and key (default: chatcore:SCHEMA, from --db); "
        "processes that serve one chat share it, other chats on the same Redis pick another",
    )
    serve.add_argument(
        "--reuse-port",
        action="store_true",
        help="listen with SO_REUSEPORT (Linux, BSD): several processes started with it "
        "share one --host and --port, and the kernel spreads new connections over them; "
        "give them the same --db and --redis",
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
    _add_operator_flags(serve)
    serve.add_argument(
        "--admin-token",
        default=None,
        help="enable the admin API (/admin/...) for requests with Authorization: Bearer "
        "this token; without the flag, $CHATCORE_ADMIN_TOKEN if set (never shown here). "
        'With --jwt-secret, tokens with "admin": true are admins too',
    )
    serve.set_defaults(func=_serve_command)
    _add_record_flags(serve)
    _add_replay_command(commands)
    add_subcommands(
        commands,
        live_options=lambda p: url_options(p, required=False),
        live_create=live_room_create,
        live_list=live_room_list,
    )
    add_admin_subcommands(commands)
    return parser


# -- record and replay ----------------------------------------------------------------


def _add_record_flags(serve: argparse.ArgumentParser) -> None:
    group = serve.add_argument_group("recording (for 'chatcore replay')")
    group.add_argument(
        "--record",
        metavar="FILE",
        help="append every command the engine handles, with its time, the ids it drew and "
        "a digest of its effects, to FILE as JSON lines. FILE holds message text, user "
        "names and resume tokens: keep it private (it is created mode 0600)",
    )
    group.add_argument(
        "--record-max-bytes",
        type=int,
        default=64 << 20,
        metavar="N",
        help="rotate FILE to FILE.1, FILE.2... past N bytes",
    )
    group.add_argument(
        "--record-keep",
        type=int,
        default=3,
        metavar="K",
        help="rotated parts kept; a record whose first part was removed cannot be replayed",
    )


def _add_replay_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "replay",
        help="run a record through a fresh engine and check it gives the same effects",
        description="Run a record made by 'chatcore serve --record FILE' (its rotated parts "
        "FILE.N included) through a fresh engine and compare every effect, byte for byte. "
        "Exit 0 if identical; 1 at the first divergence (its step, command and effect are "
        "printed); 2 if the record cannot be replayed.",
    )
    parser.add_argument("file", metavar="FILE")
    parser.add_argument(
        "--config-override",
        action="append",
        default=[],
        type=_override,
        metavar="NAME=VALUE",
        help="replay with this Config field changed (repeatable), e.g. grace_period=1",
    )
    parser.set_defaults(func=_replay_command)


def _override(text: str) -> tuple[str, object]:
    name, sep, value = text.partition("=")
    defaults = {f.name: getattr(Config(), f.name) for f in dataclasses.fields(Config)}
    if not sep or name not in defaults:
        raise argparse.ArgumentTypeError(f"not NAME=VALUE with NAME a Config field: {text!r}")
    kind = type(defaults[name])
    try:
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return name, value.lower() in ("true", "1")
        return name, kind(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} needs a {kind.__name__}: {value!r}") from None


def _record_file(args: argparse.Namespace) -> RecordFile | None:
    if args.record is None:
        return None
    try:
        return RecordFile(args.record, max_bytes=args.record_max_bytes, keep=args.record_keep)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--record: {exc}") from None


def _replay_command(args: argparse.Namespace) -> int:
    steps = 0

    def counted() -> Iterator[str]:
        nonlocal steps
        for line in read_record(args.file):
            steps += 1
            yield line

    try:
        divergence = replay(counted(), override=dict(args.config_override))
    except (RecordError, OSError, ValueError) as exc:
        print(f"chatcore replay: {args.file}: {exc}", file=sys.stderr)
        return 2
    if divergence is not None:
        print(divergence)
        return 1
    print(f"{args.file}: {max(steps - 1, 0)} steps replayed, every effect identical")
    return 0


def _add_operator_flags(serve: argparse.ArgumentParser) -> None:
    """Limits, observability and the config file (each flag's default is in --help)."""
    config, limits = Config(), Limits()
    group = serve.add_argument_group("limits")
    group.add_argument(
        "--max-connections",
        metavar="N",
        type=int,
        default=limits.max_connections,
        help="open TCP connections; a request beyond this gets 503",
    )
    group.add_argument(
        "--ping-interval",
        metavar="SECONDS",
        type=float,
        default=config.ping_interval,
        help="seconds between pings to an idle connection",
    )
    group.add_argument(
        "--pong-timeout",
        metavar="SECONDS",
        type=float,
        default=config.pong_timeout,
        help="seconds a ping may go unanswered before the connection is closed (4000)",
    )
    group.add_argument(
        "--rate-burst",
        metavar="N",
        type=int,
        default=config.rate_burst,
        help="chat messages a session may send at once",
    )
    group.add_argument(
        "--rate-per-second",
        metavar="RATE",
        type=float,
        default=config.rate_per_second,
        help="chat messages per second a session may send after its burst",
    )
    group.add_argument(
        "--request-burst",
        metavar="N",
        type=int,
        default=config.request_burst,
        help="requests of any kind (join, typing, history...) a session may make at once",
    )
    group.add_argument(
        "--request-per-second",
        metavar="RATE",
        type=float,
        default=config.request_per_second,
        help="requests per second a session may make after its burst",
    )
    group.add_argument(
        "--history-window",
        metavar="N",
        type=int,
        default=config.history_window,
        help="messages per room kept in memory; a reader further behind is closed 1013",
    )
    group.add_argument(
        "--max-rooms-per-session",
        metavar="N",
        type=int,
        default=config.max_rooms_per_session,
        help="rooms one session may be in at once",
    )
    group.add_argument(
        "--max-sessions-per-user",
        metavar="N",
        type=int,
        default=config.max_sessions_per_user,
        help="sessions one user may hold, counting those in their grace period",
    )
    group.add_argument(
        "--max-text-bytes",
        metavar="BYTES",
        type=int,
        default=config.max_text_bytes,
        help="largest message text in bytes of UTF-8",
    )
    group.add_argument(
        "--presence-batch-above",
        metavar="N",
        type=int,
        default=config.presence_batch_above,
        help="a room with more users than this announces comings and goings together, in "
        "one 'presence' frame per presence interval, instead of a 'joined' or 'left' each",
    )
    group.add_argument(
        "--presence-interval",
        metavar="SECONDS",
        type=float,
        default=config.presence_interval,
        help="how long a crowded room collects comings and goings before it tells them",
    )
    group.add_argument(
        "--retention-interval",
        metavar="SECONDS",
        type=float,
        default=limits.retention_interval,
        help="seconds between passes that cut stored rooms down to their retention limits",
    )
    group.add_argument(
        "--retain-messages",
        metavar="N",
        type=int,
        default=limits.retain_messages,
        help="the newest messages a stored room keeps, for rooms without a count limit of "
        "their own (None: keep them all)",
    )
    group.add_argument(
        "--retain-days",
        metavar="DAYS",
        type=float,
        default=None if limits.retain_age is None else limits.retain_age / 86_400,
        help="days a stored message is kept, for rooms without an age limit of their own "
        "(None: for ever)",
    )
    group = serve.add_argument_group("observability")
    group.add_argument(
        "--metrics-token",
        metavar="TOKEN",
        help="require 'Authorization: Bearer TOKEN' for /metrics (without it, /metrics is "
        "open to anyone who can reach the port: counts only, no names or messages)",
    )
    group.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="json: one JSON object per line (time, level, logger, message, exc_info)",
    )
    serve.add_argument(
        "--config",
        metavar="FILE",
        help="a TOML file of flags (keys are flag names: max-connections = 500); "
        "flags on the command line win",
    )


def _config_file(serve: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """The defaults a ``--config`` file sets, checked as the flags would be."""
    try:
        with open(path, "rb") as file:
            table = tomllib.load(file)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SystemExit(f"--config {path}: {exc}") from None
    actions = {a.dest: a for a in serve._actions if a.option_strings and a.dest != "help"}
    defaults: dict[str, Any] = {}
    for key, value in table.items():
        dest = key.removeprefix("--").replace("-", "_")
        action = actions.get(dest)
        if action is None or dest == "config":
            raise SystemExit(f"--config {path}: unknown setting {key!r}")
        values = value if isinstance(action, argparse._AppendAction) else [value]
        if not isinstance(values, list) or any(isinstance(v, dict | list) for v in values):
            raise SystemExit(f"--config {path}: {key} has the wrong type")
        try:
            converted = [_convert(action, v) for v in values]
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            raise SystemExit(f"--config {path}: {key}: {exc}") from None
        defaults[dest] = converted if isinstance(action, argparse._AppendAction) else converted[0]
    return defaults


def _convert(action: argparse.Action, value: object) -> object:
    if isinstance(value, bool) and action.type in (int, float):
        raise ValueError(f"expected a number, got {value!r}")
    if callable(action.type):
        convert = cast(Callable[[Any], object], action.type)
        value = convert(value if action.type in (int, float) else str(value))
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{value!r} is not one of {', '.join(map(str, action.choices))}")
    return value


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


def _bus(args: argparse.Namespace, store: HistoryStore) -> Bus | None:
    """The Redis bus ``--redis`` asks for, refused without a shared log."""
    if args.redis is None:
        if args.redis_prefix is not None:
            raise SystemExit("chatcore serve: --redis-prefix needs --redis")
        return None
    schema = getattr(store, "schema", None)
    if not args.db.startswith(("postgresql://", "postgres://")) or not isinstance(schema, str):
        raise SystemExit(
            "chatcore serve: --redis needs a postgresql:// --db. Several processes must share "
            "one log that numbers their messages; SQLite and memory stores belong to one "
            "process (see the README's 'Several processes')"
        )
    try:
        from chatcore_host import RedisBus
    except ImportError:
        raise SystemExit(
            "chatcore serve: --redis needs redis-py (pip install 'chatcore[redis]')"
        ) from None
    try:
        return RedisBus(args.redis, prefix=args.redis_prefix or f"chatcore:{schema}")
    except ValueError as exc:
        raise SystemExit(f"chatcore serve: --redis-prefix: {exc}") from None


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
    parser = _parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        # The file's values become defaults and the command line is read again over them.
        serve = _subcommand(parser, "serve")
        serve.set_defaults(**_config_file(serve, args.config))
        args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


def _subcommand(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser = action.choices[name]
            return found
    raise LookupError(name)


def _serve_command(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.log_format == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter())
    try:
        config = Config(
            grace_period=args.grace,
            ping_interval=args.ping_interval,
            pong_timeout=args.pong_timeout,
            rate_burst=args.rate_burst,
            rate_per_second=args.rate_per_second,
            request_burst=args.request_burst,
            request_per_second=args.request_per_second,
            history_window=args.history_window,
            max_rooms_per_session=args.max_rooms_per_session,
            max_sessions_per_user=args.max_sessions_per_user,
            max_text_bytes=args.max_text_bytes,
            presence_batch_above=args.presence_batch_above,
            presence_interval=args.presence_interval,
            max_frame_bytes=max(Config().max_frame_bytes, args.max_text_bytes + 16 * 1024),
        )
        limits = Limits(
            max_connections=args.max_connections,
            retention_interval=args.retention_interval,
            retain_messages=args.retain_messages,
            retain_age=None if args.retain_days is None else args.retain_days * 86_400,
        )
    except ValueError as exc:
        raise SystemExit(f"chatcore serve: {_flag_names(str(exc))}") from None
    if limits.max_connections < 1 or limits.retention_interval <= 0:
        raise SystemExit("chatcore serve: --max-connections and --retention-interval must be > 0")
    if args.retain_messages is not None and args.retain_messages < 0:
        raise SystemExit("chatcore serve: --retain-messages must be 0 or more")
    if args.retain_days is not None and not args.retain_days > 0:
        raise SystemExit("chatcore serve: --retain-days must be more than 0")
    if args.redis is not None and args.backend != "asyncio":
        raise SystemExit("chatcore serve: --redis runs on the asyncio backend only")
    store = _store(args.db)
    server = ChatServer(
        config=config,
        store=store,
        bus=_bus(args, store),
        host=args.host,
        port=args.port,
        reuse_port=args.reuse_port,
        ssl_context=_ssl(args.certfile, args.keyfile),
        jwt_secret=args.jwt_secret,
        allow_origins=args.allow_origin,
        ice_servers=args.ice_server,
        limits=limits,
        metrics_token=args.metrics_token,
        admin_token=args.admin_token or os.environ.get("CHATCORE_ADMIN_TOKEN") or None,
        record=_record_file(args),
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


def _flag_names(message: str) -> str:
    """``Config.history_window must be...`` as the flag the operator typed."""
    renamed = {"grace_period": "grace"}
    for field in Config.__dataclass_fields__:
        flag = "--" + renamed.get(field, field).replace("_", "-")
        message = message.replace(f"Config.{field} ", f"{flag} ")
    return message
