"""Every transport limit gives its documented answer, and the server serves on."""

from __future__ import annotations

import json

import anyio
import pytest
from websockets.exceptions import InvalidStatus

from chatcore import Config
from chatcore_server import Limits

from .conftest import (
    GUARD,
    JSON,
    Running,
    close_code,
    http_get,
    masked_frame,
    raw_exchange,
    recv,
    recv_until,
    send_raw,
    serving,
    welcome,
    ws_connect,
)

pytestmark = pytest.mark.anyio


async def still_serving(srv: Running) -> None:
    """A new client can still join and exchange a message."""
    async with (
        ws_connect(f"{srv.ws}?user=probe1&room=probe", **JSON) as a,
        ws_connect(f"{srv.ws}?user=probe2&room=probe", **JSON) as b,
    ):
        await welcome(a)
        await welcome(b)
        await a.send(json.dumps({"type": "send", "room": "probe", "text": "still here"}))
        await recv_until(b, lambda e: e.get("text") == "still here")


async def test_slow_handshake_is_cut_off() -> None:
    async with serving(limits=Limits(handshake_timeout=0.3)) as srv:
        out = await raw_exchange(srv.port, b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        assert out == b""  # closed without an answer
        await still_serving(srv)


async def test_connection_limit_answers_503_before_upgrading() -> None:
    async with serving(limits=Limits(max_connections=2)) as srv:
        async with (
            ws_connect(f"{srv.ws}?user=a&room=r", **JSON) as a,
            ws_connect(f"{srv.ws}?user=b&room=r", **JSON) as b,
        ):
            await welcome(a)
            await welcome(b)
            with pytest.raises(InvalidStatus) as refused:
                async with ws_connect(f"{srv.ws}?user=c&room=r", **JSON):
                    pass
            assert refused.value.response.status_code == 503
            assert json.loads(refused.value.response.body)["error"]["status"] == 503
        with anyio.fail_after(GUARD):  # the two closed sockets free their places
            while srv.server.connections:
                await anyio.sleep(0.01)
        await still_serving(srv)


async def test_oversized_headers_get_431_and_garbage_gets_400() -> None:
    async with serving() as srv:
        big = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n"
        assert (await raw_exchange(srv.port, big)).startswith(b"HTTP/1.1 431 ")
        assert (await raw_exchange(srv.port, b"NOT HTTP AT ALL\r\n\r\n")).startswith(
            b"HTTP/1.1 400 "
        )
        await still_serving(srv)


async def test_message_over_the_limit_closes_1009() -> None:
    config = Config(max_text_bytes=1000, max_frame_bytes=2000)
    async with serving(config=config) as srv:
        async with ws_connect(f"{srv.ws}?user=a&room=r", **JSON) as a:
            await welcome(a)
            await a.send(json.dumps({"type": "send", "room": "r", "text": "y" * 3000}))
            assert await close_code(a) == 1009
        async with ws_connect(f"{srv.ws}?user=b&room=r", **JSON) as b:
            await welcome(b)
            await b.send(["z" * 1500, "z" * 1500])  # fragmented: the sum counts
            assert await close_code(b) == 1009
        await still_serving(srv)


async def test_invalid_utf8_closes_1007_and_binary_1003() -> None:
    async with serving() as srv:
        async with ws_connect(f"{srv.ws}?user=a&room=r", **JSON) as a:
            await welcome(a)
            await send_raw(a, masked_frame(0x1, b'{"type":"send","text":"\xff\xfe"}'))
            assert await close_code(a) == 1007
        async with ws_connect(f"{srv.ws}?user=b&room=r", **JSON) as b:
            await welcome(b)
            await b.send(b"\x00\x01")
            assert await close_code(b) == 1003
        await still_serving(srv)


async def test_plain_request_to_ws_gets_426() -> None:
    async with serving() as srv:
        status, headers, body = await http_get(f"{srv.url}ws?user=a&room=r")
        assert status == 426
        assert headers["upgrade"] == "websocket"
        assert json.loads(body)["error"]["status"] == 426
        await still_serving(srv)


async def test_origin_allow_list() -> None:
    async with serving(allow_origins=["https://chat.example"]) as srv:
        with pytest.raises(InvalidStatus) as refused:
            async with ws_connect(f"{srv.ws}?user=a&room=r", origin="http://evil.example"):
                pass
        assert refused.value.response.status_code == 403
        for origin in (srv.url.rstrip("/"), "https://chat.example"):
            async with ws_connect(f"{srv.ws}?user=a&room=r", origin=origin, **JSON) as ok:
                assert (await recv(ok))["type"] == "welcome"
        await still_serving(srv)


async def test_bad_connect_parameters_get_400() -> None:
    async with serving() as srv:
        for query in ("room=r", "user=bad%20name&room=r", "user=a&room=r&offset=nope"):
            with pytest.raises(InvalidStatus) as refused:
                async with ws_connect(f"{srv.ws}?{query}"):
                    pass
            assert refused.value.response.status_code == 400
        await still_serving(srv)
