"""``chatcore serve`` as a real process: SIGTERM/SIGINT close every client with 1001, exit 0."""

from __future__ import annotations

import re
import signal
import ssl
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
import trustme
from anyio.abc import Process
from anyio.streams.text import TextReceiveStream

from .conftest import GUARD, JSON, close_code, http_get, welcome, ws_connect

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def chatcore_serve(*args: str) -> AsyncIterator[tuple[Process, str]]:
    """``python -m chatcore_server serve --port 0 ARGS``, and the URL it printed."""
    command = [sys.executable, "-m", "chatcore_server", "serve", "--port", "0", *args]
    async with await anyio.open_process(command) as process:
        assert process.stdout is not None
        try:
            url = ""
            with anyio.fail_after(GUARD):
                async for chunk in TextReceiveStream(process.stdout):
                    found = re.search(r"open (https?://127\.0\.0\.1:\d+/)", chunk)
                    if found:
                        url = found.group(1)
                        break
            yield process, url
        finally:
            if process.returncode is None:
                process.kill()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_signal_closes_clients_1001_and_exits_0(signum: signal.Signals) -> None:
    async with chatcore_serve("--db", "memory") as (process, url):
        ws = url.replace("http", "ws", 1) + "ws"
        async with (
            ws_connect(f"{ws}?user=alice&room=general", **JSON) as alice,
            ws_connect(f"{ws}?user=bob&room=general", **JSON) as bob,
            ws_connect(f"{ws}?user=carol&room=tech") as carol,
        ):
            await welcome(alice)
            await welcome(bob)
            await carol.recv()
            process.send_signal(signum)
            for conn in (alice, bob, carol):
                assert await close_code(conn) == 1001
        with anyio.fail_after(GUARD + 2):
            assert await process.wait() == 0
        assert process.stderr is not None
        log = ""
        with anyio.fail_after(GUARD):
            async for chunk in TextReceiveStream(process.stderr):
                log += chunk
        assert log.count("code=1001") == 3
        assert "chatcore stopped" in log


async def test_cli_serves_tls_from_cert_files(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    client = ssl.create_default_context()
    ca.configure_trust(client)
    args = ("--db", "memory", "--certfile", str(certfile), "--keyfile", str(keyfile))
    async with chatcore_serve(*args) as (process, url):
        assert url.startswith("https://")
        status, _, _ = await http_get(f"{url}healthz", context=client)
        assert status == 200
        wss = url.replace("https", "wss", 1) + "ws"
        async with ws_connect(f"{wss}?user=alice&room=general", ssl=client, **JSON) as alice:
            await welcome(alice)
            process.send_signal(signal.SIGTERM)
            assert await close_code(alice) == 1001
        with anyio.fail_after(GUARD + 2):
            assert await process.wait() == 0
