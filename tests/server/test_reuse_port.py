"""``chatcore serve --reuse-port``: several processes on one port, each accepting.

Two real ``chatcore serve`` processes (memory store: accepting needs no shared
log) are started on one fixed port. Without the flag the second cannot listen;
with it on both, new connections are spread over them by the kernel, and each
process logs the connections it accepted.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import websockets.sync.client
from websockets.typing import Subprotocol

ROOT = Path(__file__).resolve().parents[2]
GUARD = 10.0  # seconds: a bound on every wait, never a timing assertion
OPENED = re.compile(r"opened conn=\d+ user=(u\d+)")
CONNECTIONS = 32  # all on one process by chance: 2 ** -31


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def _serve(port: int, log: Path, *flags: str) -> Iterator[subprocess.Popen[bytes]]:
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}:{ROOT / 'adapters'}")
    with log.open("wb") as err:
        command = [
            sys.executable, "-m", "chatcore_server", "serve", "--port", str(port),
            "--db", "memory", "--log-level", "info", *flags,
        ]  # fmt: skip
        proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
        )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(GUARD)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _running(proc: subprocess.Popen[bytes]) -> bool:
    """True once the process prints its URL; False if it exited instead."""
    assert proc.stdout is not None
    line = proc.stdout.readline()  # bounded: the process prints it or exits
    return b"chatcore is running" in line


def test_two_processes_with_reuse_port_share_a_port_and_both_accept(tmp_path: Path) -> None:
    port = _free_port()
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    with (
        _serve(port, logs[0], "--reuse-port") as a,
        _serve(port, logs[1], "--reuse-port") as b,
    ):
        assert _running(a), logs[0].read_text()
        assert _running(b), logs[1].read_text()
        with contextlib.ExitStack() as stack:
            for i in range(CONNECTIONS):
                conn = stack.enter_context(
                    websockets.sync.client.connect(
                        f"ws://127.0.0.1:{port}/ws?user=u{i}&room=lobby",
                        subprotocols=[Subprotocol("chatcore.v1")],
                        proxy=None,
                        open_timeout=GUARD,
                        close_timeout=GUARD,
                        max_queue=None,  # unread presence frames must not stop its reading
                    )
                )
                assert '"welcome"' in str(conn.recv(timeout=GUARD))
        accepted = [set(OPENED.findall(log.read_text())) for log in logs]
    assert accepted[0], accepted  # both processes accepted some
    assert accepted[1], accepted
    assert not accepted[0] & accepted[1]
    assert accepted[0] | accepted[1] == {f"u{i}" for i in range(CONNECTIONS)}


def test_without_reuse_port_a_second_process_cannot_listen_on_the_port(tmp_path: Path) -> None:
    port = _free_port()
    with _serve(port, tmp_path / "a.log") as a:
        assert _running(a)  # listening before the second one tries
        with _serve(port, tmp_path / "b.log", "--reuse-port") as b:
            assert not _running(b)
            assert b.wait(GUARD) == 1
    assert "cannot listen" in (tmp_path / "b.log").read_text()


if sys.platform != "linux":  # SO_REUSEPORT's spreading is Linux's (BSDs differ)
    pytestmark = pytest.mark.skip(reason="SO_REUSEPORT load spreading is tested on Linux")
