"""``chatcore serve`` as a real process: SIGTERM/SIGINT close every client with 1001, exit 0."""

from __future__ import annotations

import re
import signal
import sys

import anyio
import pytest
from anyio.streams.text import TextReceiveStream

from .conftest import GUARD, JSON, close_code, welcome, ws_connect

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_signal_closes_clients_1001_and_exits_0(signum: signal.Signals) -> None:
    command = [sys.executable, "-m", "chatcore_server", "serve", "--port", "0", "--db", "memory"]
    async with await anyio.open_process(command) as process:
        assert process.stdout is not None
        assert process.stderr is not None
        try:
            url = ""
            with anyio.fail_after(GUARD):
                async for chunk in TextReceiveStream(process.stdout):
                    found = re.search(r"open (http://127\.0\.0\.1:\d+/)", chunk)
                    if found:
                        url = found.group(1)
                        break
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
            log = ""
            with anyio.fail_after(GUARD):
                async for chunk in TextReceiveStream(process.stderr):
                    log += chunk
            assert "code=1001" in log
            assert "chatcore stopped" in log
        finally:
            if process.returncode is None:
                process.kill()
