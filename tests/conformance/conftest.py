"""Launchers: each kind of server the conformance suite runs against, as a real process.

Every test in this folder talks to a server over loopback only (``websockets``
for WebSocket, ``urllib`` or a raw socket for HTTP) and asserts only what
docs/protocol.md promises. It never imports the server: the same test must
pass against every adapter, so the server is whatever process a
:class:`Launcher` starts.

Fixtures
--------

``server``
    A :class:`Server` shared by every test of a module, started with the
    module's ``SERVER_OPTIONS`` (an :class:`Options`; the defaults when the
    module has none). Tests in a shared server use fresh user and room names
    (``wire.unique``) so that they do not see each other.
``start_server``
    A factory, ``start_server(Options(...)) -> Server``, for a test that needs
    a server of its own (one it shuts down, for instance); stopped after the test.
``launcher``
    The :class:`Launcher` in use; both fixtures above are parametrized over
    :data:`LAUNCHERS`, so every test runs once per kind of server
    (``test_x[chatcore-serve]``; ``-k chatcore-serve`` picks one).

Adding a server
---------------

Subclass :class:`Launcher`, give it a ``name`` (the test id) and a
``command`` that starts it listening on ``127.0.0.1:port`` with history in
``db`` (a ``--db`` URL: ``sqlite:////abs/path`` or ``memory``) and the
``options``, then append an instance to :data:`LAUNCHERS`. For instance, for
an ASGI app that reads its settings from the environment::

    class Uvicorn(Launcher):
        name = "uvicorn"

        def command(self, *, port: int, db: str, options: Options) -> list[str]:
            return [sys.executable, "-m", "uvicorn", "examples.asgi_app:app",
                    "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]

        def environment(self, *, port: int, db: str, options: Options) -> dict[str, str]:
            env = {"CHATCORE_DB": db}
            if options.grace is not None:
                env["CHATCORE_GRACE"] = str(options.grace)
            if options.jwt_secret is not None:
                env["CHATCORE_JWT_SECRET"] = options.jwt_secret
            return env

Hypercorn is the same with ``-m hypercorn examples.asgi_app:app --bind
127.0.0.1:PORT``. (The uvicorn and hypercorn launchers below set
``inherits_socket``: they serve from a listening socket made here with a
fixed ``SO_SNDBUF``, as ``chatcore serve`` sets its own, so that the kernel's
autotuned buffers do not hide a reader that stops reading.) Server processes
start in the repository's root (``ROOT``), so module paths such as
``examples.asgi_app:app`` resolve.

The rest is shared and needs nothing from the new server but this:

* it answers ``GET /healthz`` with 200 once it accepts connections (the
  readiness probe; polled every 50 ms for up to ``STARTUP`` seconds);
* it reads the history store named by ``db``: private rooms are written there
  beforehand with ``python -m chatcore_store rooms create`` (so
  ``Options.private_rooms`` needs a SQLite store, the default);
* SIGTERM shuts it down gracefully (that is what ``test_shutdown`` checks,
  and how every server is stopped after its tests).

A launcher that cannot honour an option calls ``pytest.skip(reason)`` from
``command``: the tests that need it are then skipped for that server alone.
An option that ``chatcore serve`` gains a flag for (the engine's limits, say)
becomes a new field of :class:`Options` with ``None`` meaning "the default",
passed on by each launcher.
Start uvicorn and hypercorn with ``python -m`` and ``sys.executable``, so that
they run from the test's own environment (and its ``PYTHONPATH``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import pytest

ROOT = Path(__file__).resolve().parents[2]
"""The repository: every server process starts here (``examples.asgi_app:app`` resolves)."""
STARTUP = 20.0  # seconds a server may take to answer /healthz
STOP = 15.0  # seconds a server may take to exit after SIGTERM (then it is killed)


@dataclass(frozen=True, kw_only=True)
class Options:
    """What a test needs of its server; a launcher turns it into flags or settings."""

    grace: float | None = None
    """Seconds a dropped session waits for a resume (None: the server's default, 30 s)."""
    store: Literal["sqlite", "memory"] = "sqlite"
    """History store: a SQLite file of the server's own, or memory."""
    jwt_secret: str | None = None
    """Require an HS256 token whose ``sub`` names the user (None: authentication off)."""
    private_rooms: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Private rooms created before the server starts: name -> users on its allow list."""
    admin_token: str | None = None
    """Bearer token of the admin API (None: the API answers 403 but to JWT admins)."""


SEND_BUFFER = 64 * 1024
"""``SO_SNDBUF`` of the listening socket handed to an ASGI server (its connections inherit
it): ``chatcore serve`` asks the same of each upgraded socket (``Limits.send_buffer``).
Left alone, the kernel autotunes it to megabytes on loopback, and a reader that stops
reading is found only once those are full."""


class Launcher:
    """One kind of server: the command that starts it. Subclass and add to ``LAUNCHERS``."""

    name: ClassVar[str]
    inherits_socket: ClassVar[bool] = False
    """The server listens on a socket made for it (``fd``), with ``SEND_BUFFER``."""

    def command(self, *, port: int, db: str, options: Options, fd: int = -1) -> list[str]:
        """The argv that runs the server on ``127.0.0.1:port`` with store ``db``.

        With ``inherits_socket``, ``fd`` is a socket listening on that port, open in
        the server's process (``uvicorn --fd``, ``hypercorn --bind fd://``).
        """
        raise NotImplementedError

    def environment(self, *, port: int, db: str, options: Options) -> dict[str, str]:
        """Variables added to the test's own environment for the server process."""
        return {}


class ChatcoreServe(Launcher):
    """The standalone server: ``python -m chatcore_server serve``."""

    name = "chatcore-serve"

    def command(self, *, port: int, db: str, options: Options, fd: int = -1) -> list[str]:
        argv = [sys.executable, "-m", "chatcore_server", "serve"]
        argv += ["--host", "127.0.0.1", "--port", str(port), "--db", db]
        argv += ["--log-level", "warning"]
        if options.grace is not None:
            argv += ["--grace", str(options.grace)]
        if options.jwt_secret is not None:
            argv += ["--jwt-secret", options.jwt_secret]
        if options.admin_token is not None:
            argv += ["--admin-token", options.admin_token]
        return argv


def _asgi_environment(db: str, options: Options) -> dict[str, str]:
    """``examples/asgi_app.py`` reads ``chatcore serve``'s flags from these (chatcore_asgi._env)."""
    env = {"CHATCORE_DB": db}
    if options.grace is not None:
        env["CHATCORE_GRACE"] = str(options.grace)
    if options.jwt_secret is not None:
        env["CHATCORE_JWT_SECRET"] = options.jwt_secret
    if options.admin_token is not None:
        env["CHATCORE_ADMIN_TOKEN"] = options.admin_token
    return env


class Uvicorn(Launcher):
    """``ChatApp`` under uvicorn, its ``websockets`` implementation pinned.

    uvicorn's ``wsproto`` implementation writes without waiting for the socket
    (``send`` never blocks), so a reader that stops reading would only be
    found by the ASGI server's buffer growing: the ``websockets`` ones wait.
    """

    name = "uvicorn"
    inherits_socket = True

    def command(self, *, port: int, db: str, options: Options, fd: int = -1) -> list[str]:
        return [
            sys.executable, "-m", "uvicorn", "examples.asgi_app:app",
            "--fd", str(fd), "--log-level", "warning",
            "--ws", "websockets-sansio", "--ws-max-size", str(80 * 1024),
            "--lifespan", "on",
        ]  # fmt: skip

    def environment(self, *, port: int, db: str, options: Options) -> dict[str, str]:
        return _asgi_environment(db, options)


class Hypercorn(Launcher):
    """``ChatApp`` under hypercorn (asyncio worker)."""

    name = "hypercorn"
    inherits_socket = True

    def command(self, *, port: int, db: str, options: Options, fd: int = -1) -> list[str]:
        return [
            sys.executable, "-m", "hypercorn", "examples.asgi_app:app",
            "--bind", f"fd://{fd}", "--log-level", "warning",
        ]  # fmt: skip

    def environment(self, *, port: int, db: str, options: Options) -> dict[str, str]:
        return _asgi_environment(db, options)


LAUNCHERS: list[Launcher] = [ChatcoreServe(), Uvicorn(), Hypercorn()]

_REASSEMBLED = (
    "the ASGI server reassembles a message before the app sees it: its fragments "
    "cannot be counted (protocol.md, Behind an ASGI server)"
)
_CLOSE_CODE_LOST = (
    "hypercorn reports every client close to the app as 1006: a close with 1000, or "
    "without a code, keeps the session for the grace period"
)
ASGI_SERVER_LIMITS: dict[str, dict[str, str]] = {
    "uvicorn": {
        "test_a_query_over_8_kib_is_refused_414": (
            "uvicorn (websockets) refuses a request line over 8 KiB itself, as plain text"
        ),
        "test_a_bad_frame_closes_that_connection_alone[over-64-fragments]": _REASSEMBLED,
        "test_80_kib_in_64_fragments_is_the_bound[one-more]": _REASSEMBLED,
        "test_sigterm_closes_every_client_1001": (
            "uvicorn closes WebSockets itself with 1012 before the app hears of a shutdown"
        ),
    },
    "hypercorn": {
        "test_a_bad_frame_closes_that_connection_alone[over-64-fragments]": _REASSEMBLED,
        "test_80_kib_in_64_fragments_is_the_bound[one-more]": _REASSEMBLED,
        "test_sigterm_closes_every_client_1001": (
            "hypercorn cancels the app's WebSockets (1011) before the app hears of a shutdown"
        ),
        "test_a_bad_frame_closes_that_connection_alone[invalid-utf8]": (
            "hypercorn drops a connection that sends invalid UTF-8 without a close frame"
        ),
        "test_plain_text_mode_without_subprotocol": _CLOSE_CODE_LOST,
        "test_closing_with_1000_ends_the_session_at_once": _CLOSE_CODE_LOST,
        "test_a_close_frame_without_a_code_ends_the_session": _CLOSE_CODE_LOST,
        "test_within_grace_the_missed_messages_come_once_in_order": _CLOSE_CODE_LOST,
    },
}
"""What an ASGI server cannot do, by launcher: test name (``[params]`` without the
launcher's id, or none for every case) -> reason. Marked xfail(strict=True) for that
launcher alone, so a server that gains the ability turns the mark into a failure."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is None or "launcher" not in callspec.params:
            continue
        limits = ASGI_SERVER_LIMITS.get(callspec.params["launcher"].name, {})
        names = {launcher.name for launcher in LAUNCHERS}
        rest = [i for i in callspec.id.split("-") if i not in names]
        name = getattr(item, "originalname", item.name)
        reason = limits.get(f"{name}[{'-'.join(rest)}]") or limits.get(name)
        if reason is not None:
            item.add_marker(pytest.mark.xfail(strict=True, reason=reason))


@dataclass(frozen=True)
class Server:
    """A running server process and where to reach it."""

    launcher: str
    port: int
    process: subprocess.Popen[bytes]
    options: Options
    log: Path
    """The process's stdout and stderr."""

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT/``."""
        return f"http://127.0.0.1:{self.port}/"

    def ws(self, query: str = "") -> str:
        """``ws://127.0.0.1:PORT/ws?QUERY``."""
        return f"ws://127.0.0.1:{self.port}/ws" + (f"?{query}" if query else "")


def _listening_socket() -> socket.socket:
    """A loopback socket listening on a free port, its send buffer ``SEND_BUFFER``."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _create_private_rooms(db: str, rooms: Mapping[str, tuple[str, ...]]) -> None:
    for room, allow in rooms.items():
        argv = [sys.executable, "-m", "chatcore_store", "rooms", "create", room, "--private"]
        argv += ["--allow", ",".join(allow), "--db", db]
        subprocess.run(argv, check=True, capture_output=True, timeout=STARTUP)


def _healthy(port: int) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}/healthz", timeout=1.0) as reply:
            return bool(reply.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def launch(launcher: Launcher, options: Options, workdir: Path) -> Iterator[Server]:
    """Start ``launcher``'s server with ``options``; stop it (SIGTERM) when the block ends."""
    if options.store == "memory":
        if options.private_rooms:
            raise ValueError("private rooms are written to the store first: use SQLite")
        db = "memory"
    else:
        db = f"sqlite:///{workdir / 'chat.db'}"  # an absolute path: sqlite:////tmp/...
        _create_private_rooms(db, options.private_rooms)
    log = workdir / "server.log"
    for _attempt in range(3):  # another process may take the free port before the server
        listener = _listening_socket() if launcher.inherits_socket else None
        fd = -1 if listener is None else listener.fileno()
        port = _free_port() if listener is None else listener.getsockname()[1]
        env = {**os.environ, **launcher.environment(port=port, db=db, options=options)}
        argv = launcher.command(port=port, db=db, options=options, fd=fd)
        with log.open("ab") as out:
            process = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ROOT,
                pass_fds=() if listener is None else (fd,),
            )
        if listener is not None:
            listener.close()  # the server's copy listens on
        try:
            deadline = time.monotonic() + STARTUP
            while process.poll() is None and time.monotonic() < deadline:
                if _healthy(port):
                    break
                time.sleep(0.05)
            else:
                if process.poll() is not None:
                    continue  # exited: most likely the port was taken; try another
                raise RuntimeError(f"{launcher.name} not ready after {STARTUP} s: {log}")
            yield Server(launcher.name, port, process, options, log)
            return
        finally:
            _stop(process)
    raise RuntimeError(f"{launcher.name} did not start:\n{log.read_text(errors='replace')}")


@pytest.fixture
def anyio_backend() -> str:
    # The server is another process: the client's event loop is not what is tested.
    return "asyncio"


@pytest.fixture(scope="module", params=LAUNCHERS, ids=lambda launcher: launcher.name)
def launcher(request: pytest.FixtureRequest) -> Launcher:
    chosen: Launcher = request.param
    return chosen


@pytest.fixture(scope="module")
def server(
    launcher: Launcher, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """One server for the whole module, started with its ``SERVER_OPTIONS``."""
    options = getattr(request.module, "SERVER_OPTIONS", Options())
    with launch(launcher, options, tmp_path_factory.mktemp(launcher.name)) as running:
        yield running


@pytest.fixture
def start_server(
    launcher: Launcher, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[Options], Server]]:
    """``start_server(Options(...))``: a server of the test's own, stopped after it."""
    with ExitStack() as stack:

        def start(options: Options) -> Server:
            workdir = tmp_path_factory.mktemp(launcher.name)
            return stack.enter_context(launch(launcher, options, workdir))

        yield start
