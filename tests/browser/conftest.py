"""Fixtures for the browser tests: a real ``chatcore serve`` process, a TCP relay
whose cable a test can pull, and headless Chromium driven by Playwright.

Chromium is Debian's ``/usr/bin/chromium`` (``apt-get install chromium``); Playwright's
own browser download is never used. Without Chromium or Playwright the tests skip,
except under ``CI=true``, where a missing browser is a failure.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "browser"
GRACE = 30.0  # seconds the server keeps a dropped session; the test is back well within it


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (required when CI=true)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Chromium for this module only: Playwright's sync API holds an event loop in
    this thread while it runs, which the asyncio tests of other folders cannot share."""
    try:
        import chatcore_server  # noqa: F401
    except ImportError:
        _unavailable("server adapter not available")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[dev]')")
    if not CHROMIUM.exists():
        _unavailable(f"chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@contextlib.contextmanager
def chat_server(grace: float, *extra: str) -> Iterator[str]:
    """A ``chatcore serve`` process on a free loopback port (``extra``: more of its
    options); yields its base URL."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "chatcore_server",
            "serve",
            "--port",
            "0",
            "--db",
            "memory",
            "--grace",
            str(grace),
            "--log-level",
            "warning",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()

    def read_stdout() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=read_stdout, daemon=True).start()
    url = None
    try:
        for _ in range(20):  # the URL is among the first lines printed
            match = re.search(r"open (http://\S+/) in a browser", lines.get(timeout=20))
            if match:
                url = match.group(1)
                break
        assert url is not None, "chatcore serve printed no URL"
        yield url.rstrip("/")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def server() -> Iterator[str]:
    with chat_server(GRACE) as url:
        yield url


@pytest.fixture
def short_grace_server() -> Iterator[str]:
    """A server that forgets a dropped session after one second."""
    with chat_server(1.0) as url:
        yield url


class NetworkLink:
    """A TCP relay on 127.0.0.1 in front of the server, with a cable to pull.

    :meth:`cut` resets every relayed connection at once, both ways: the server
    sees its socket die without a WebSocket close frame, as when Wi-Fi drops.
    While cut, new connections are reset on arrival. :meth:`restore` reconnects.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self._target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._up = True
        self._open: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            self._up = False
            doomed, self._open = self._open, set()
        for s in doomed:
            _reset(s)

    def restore(self) -> None:
        with self._lock:
            self._up = True

    def close(self) -> None:
        self.cut()
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                if not self._up:
                    _reset(client)
                    continue
                try:
                    upstream = socket.create_connection(self._target, timeout=5)
                except OSError:
                    _reset(client)
                    continue
                upstream.settimeout(None)
                self._open |= {client, upstream}
            done = threading.Barrier(2)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst, done), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, done: threading.Barrier) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)  # pass the end of the stream on, as TCP would
        with contextlib.suppress(threading.BrokenBarrierError):
            if done.wait(timeout=30) == 0:  # both ways finished: let go of the pair
                with self._lock:
                    self._open -= {src, dst}
                src.close()
                dst.close()


def _reset(s: socket.socket) -> None:
    """Close with an RST, waking any thread blocked reading it."""
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RD)
    s.close()


@pytest.fixture
def relay() -> Iterator[Callable[[str], tuple[NetworkLink, str]]]:
    """Put a cuttable link in front of a server: gives the link and the URL through it."""
    links: list[NetworkLink] = []

    def put_in_front(base: str) -> tuple[NetworkLink, str]:
        host, port = base.removeprefix("http://").rsplit(":", 1)
        links.append(NetworkLink((host, int(port))))
        return links[-1], f"http://127.0.0.1:{links[-1].port}"

    try:
        yield put_in_front
    finally:
        for link in links:
            link.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Where screenshots go (``artifacts/browser/`` in the repository, git-ignored)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
