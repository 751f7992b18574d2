"""Several real ``chatcore serve`` processes on one PostgreSQL log and one Redis bus.

Each test gets a PostgreSQL schema of its own (dropped afterwards) and a Redis
prefix derived from it, so parallel and repeated runs never hear each other.
PostgreSQL or Redis unreachable: the test is skipped with the reason, or fails
under ``CI=true``. Clients are raw ``websockets`` connections, read by a task
each into a list the test inspects.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

ROOT = Path(__file__).resolve().parents[2]
PG_URL = os.environ.get("CHATCORE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("CHATCORE_TEST_REDIS", "redis://127.0.0.1:6379/0")
URL_LINE = re.compile(rb"chatcore is running: open http://127\.0\.0\.1:(\d+)/")
GUARD = 20.0  # seconds: a bound on every wait, never a timing assertion


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the bus runs on asyncio (redis-py), as psycopg does


def _unavailable(why: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(why)
    pytest.skip(why)


def pg_problem() -> str | None:
    try:
        import psycopg
    except ImportError:  # pragma: no cover
        return "psycopg is not installed (pip install 'chatcore[postgres]')"
    try:
        with psycopg.connect(PG_URL, connect_timeout=3) as db:
            db.execute("SELECT 1")
    except psycopg.Error as exc:
        return f"PostgreSQL at {PG_URL} is unreachable: {exc}"
    return None


def redis_problem(url: str = REDIS_URL) -> str | None:
    try:
        import redis
    except ImportError:  # pragma: no cover
        return "redis-py is not installed (pip install 'chatcore[redis]')"
    try:
        client = redis.Redis.from_url(url, socket_timeout=3, socket_connect_timeout=3)
        client.ping()
        client.close()
    except (redis.RedisError, OSError) as exc:
        return f"Redis at {url} is unreachable: {exc}"
    return None


@pytest.fixture(scope="session")
def services() -> None:
    for problem in (pg_problem(), redis_problem()):
        if problem is not None:
            _unavailable(problem)


def drop_schema(schema: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(PG_URL, autocommit=True) as db:
        db.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Server:
    """One ``chatcore serve`` process."""

    process: anyio.abc.Process
    port: int
    log: Path

    def ws(
        self,
        user: str,
        rooms: Sequence[str] = (),
        resume: str | None = None,
        offsets: Mapping[str, tuple[int, str]] | None = None,
    ) -> str:
        """The ``/ws`` URL; ``offsets`` maps a room to the (offset, epoch) last seen."""
        query = f"user={user}" + "".join(f"&room={r}" for r in rooms)
        if resume is not None:
            query += f"&resume={resume}"
        for room, (offset, epoch) in (offsets or {}).items():
            query += f"&offset={room}:{offset}&epoch={room}:{epoch}"
        return f"ws://127.0.0.1:{self.port}/ws?{query}"

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGKILL)


@dataclass
class Cluster:
    """Servers sharing one schema and one Redis prefix."""

    schema: str
    prefix: str
    tmp: Path
    redis_url: str = REDIS_URL
    servers: list[Server] = field(default_factory=list)
    _started: int = 0
    # Streams in these tests send faster than a person: no rate limit in the way.
    extra: Sequence[str] = ("--rate-burst", "1000", "--rate-per-second", "1000")

    async def start(self, port: int = 0, *args: str) -> Server:
        self._started += 1
        log_path = self.tmp / f"server{self._started}.log"
        log = log_path.open("ab")  # read it when a test fails
        process = await anyio.open_process(
            [
                sys.executable,
                "-m",
                "chatcore_server",
                "serve",
                "--port",
                str(port),
                "--db",
                f"{PG_URL}?schema={self.schema}",
                "--redis",
                self.redis_url,
                "--redis-prefix",
                self.prefix,
                "--log-level",
                "info",
                *self.extra,
                *args,
            ],
            cwd=ROOT,
            stderr=log,
        )
        log.close()
        assert process.stdout is not None
        seen = b""
        with anyio.fail_after(GUARD):
            while (match := URL_LINE.search(seen)) is None:
                seen += await process.stdout.receive()
        server = Server(process, int(match.group(1)), log_path)
        self.servers.append(server)
        return server

    async def start_many(self, count: int) -> list[Server]:
        """``count`` servers: the first alone (it creates the schema), the rest at once."""
        first = [await self.start()] if not self.servers else []
        async with anyio.create_task_group() as tg:
            for _ in range(count - len(first)):
                tg.start_soon(self.start)
        return [*first, *self.servers[len(self.servers) - count + len(first) :]]

    def logs(self) -> str:
        return "\n".join(
            f"--- {s.log.name}\n{s.log.read_text(errors='replace')[-4000:]}" for s in self.servers
        )


@pytest.fixture
async def cluster(services: None, tmp_path: Path) -> AsyncIterator[Cluster]:
    schema = f"test_cluster_{os.getpid()}_{secrets.token_hex(4)}"
    made = Cluster(schema=schema, prefix=f"test:{schema}", tmp=tmp_path)
    try:
        yield made
    finally:
        for server in made.servers:
            if server.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    server.process.send_signal(signal.SIGTERM)
        for server in made.servers:
            with anyio.move_on_after(10):
                await server.process.wait()
            server.kill()
            await server.process.aclose()
        drop_schema(schema)


class Client:
    """One WebSocket connection and every event it received, in order."""

    def __init__(self, conn: ClientConnection, welcome: dict[str, Any]) -> None:
        self.conn = conn
        self.welcome = welcome
        self.events: list[dict[str, Any]] = []
        self.closed = False
        self._new = anyio.Event()

    async def read(self) -> None:
        try:
            async for data in self.conn:
                self.events.append(json.loads(data))
                self._new.set()
                self._new = anyio.Event()
        except ConnectionClosed:
            pass
        finally:
            self.closed = True
            self._new.set()

    def of(self, kind: str, room: str | None = None) -> list[dict[str, Any]]:
        return [
            e for e in self.events if e["type"] == kind and (room is None or e.get("room") == room)
        ]

    def messages(self, room: str) -> list[dict[str, Any]]:
        return self.of("message", room)

    async def until(self, pred: Callable[[Client], bool], what: str = "") -> None:
        try:
            with anyio.fail_after(GUARD):
                while not pred(self):
                    if self.closed:
                        raise AssertionError(f"connection closed while waiting for {what}")
                    await self._new.wait()
        except TimeoutError:
            user = self.welcome.get("user")
            raise AssertionError(f"{user} waited for {what}; got {self.events[-12:]}") from None

    async def send(self, obj: dict[str, Any]) -> None:
        await self.conn.send(json.dumps(obj))


@contextlib.asynccontextmanager
async def clients(urls: Sequence[str]) -> AsyncIterator[list[Client]]:
    """Connect to each URL (after its welcome), read all of them until the block ends."""
    async with contextlib.AsyncExitStack() as stack, anyio.create_task_group() as tg:
        made: list[Client] = []
        for url in urls:
            conn = await stack.enter_async_context(
                connect(url, subprotocols=["chatcore.v1"], open_timeout=GUARD, proxy=None)
            )
            with anyio.fail_after(GUARD):
                welcome = json.loads(await conn.recv())
            assert welcome["type"] == "welcome", welcome
            client = Client(conn, welcome)
            tg.start_soon(client.read)
            made.append(client)
        try:
            yield made
        finally:
            tg.cancel_scope.cancel()


def http_get(server: Server, path: str) -> tuple[int, bytes]:
    """GET ``path`` from a server (blocking: run it in a thread)."""
    url = f"http://127.0.0.1:{server.port}{path}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=GUARD) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def metric(text: bytes, name: str) -> float:
    for line in text.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


async def subscribed(server: Server, channels: int) -> None:
    """Wait until Redis confirmed at least ``channels`` subscriptions of the server
    (its control channel, one per user with a session there, one per room held)."""
    with anyio.fail_after(GUARD):
        while True:
            _, text = await anyio.to_thread.run_sync(http_get, server, "/metrics")
            if metric(text, "chatcore_bus_channels") >= channels:
                return
            await anyio.sleep(0.02)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "redis_outage: stops and restarts a Redis server (one of its own, never the shared one)",
    )


def redis_args(port: int, bind: str, log: Path) -> list[str]:
    """``redis-server`` options for a test's own server: nothing kept on disk."""
    return [
        "--port", str(port), "--bind", bind, "--save", "", "--appendonly", "no",
        "--dir", str(log.parent), "--logfile", str(log),
    ]  # fmt: skip


class PrivateRedis:
    """A ``redis-server`` of the test's own on a free port: stopped and started at will,
    so an outage test never touches the machine's shared Redis."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.tmp = tmp
        self.process: anyio.abc.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        import shutil

        binary = shutil.which("redis-server")
        if binary is None:
            _unavailable("redis-server is not installed (the outage tests run one of their own)")
            return
        self.process = await anyio.open_process(
            [binary, *redis_args(self.port, "127.0.0.1", self.tmp / f"redis-{self.port}.log")]
        )
        with anyio.fail_after(GUARD):
            while redis_problem(self.url) is not None:
                await anyio.sleep(0.05)

    async def stop(self) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGKILL)
            with anyio.fail_after(GUARD):
                await self.process.wait()
            await self.process.aclose()
            self.process = None


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[PrivateRedis]:
    made = PrivateRedis(tmp_path)
    await made.start()
    try:
        yield made
    finally:
        await made.stop()


class Blackhole:
    """A TCP proxy in front of Redis that can go silent: the connections open at that
    moment stop passing bytes either way (a half-open link, a deaf subscriber), while
    new ones work."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._generation = 0
        self._listener: anyio.abc.SocketListener | None = None

    def silence(self) -> None:
        self._generation += 1

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
            self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
            task_status.started()
            await listener.serve(self._relay)

    async def _relay(self, client: anyio.abc.SocketStream) -> None:
        born = self._generation
        async with client, await anyio.connect_tcp("127.0.0.1", self.target_port) as upstream:

            async def pump(src: anyio.abc.SocketStream, dst: anyio.abc.SocketStream) -> None:
                with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                    async for chunk in src:
                        if self._generation != born:
                            await anyio.sleep_forever()
                        await dst.send(chunk)

            async with anyio.create_task_group() as tg:
                tg.start_soon(pump, client, upstream)
                tg.start_soon(pump, upstream, client)
