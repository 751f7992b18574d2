"""The server's message hook over real sockets: sync or async, and one that fails."""

from __future__ import annotations

import json

import anyio
import pytest

from chatcore import Screen, Screened

from .conftest import JSON, recv_until, serving, welcome, ws_connect

pytestmark = pytest.mark.anyio


def send(text: str, cid: str) -> str:
    return json.dumps({"type": "send", "room": "general", "text": text, "id": cid})


async def slow_filter(screen: Screen) -> Screened:
    if screen.text == "first":
        await anyio.sleep(0.2)  # a slow verdict: the next message must still come after it
    if "spam" in screen.text:
        return screen.refuse("no spam here")
    return screen.replace(screen.text.replace("heck", "h*ck"))


def broken(screen: Screen) -> Screened:
    if screen.text == "boom":
        raise RuntimeError("the filter has a bug")
    return screen.accept()


async def test_an_async_hook_refuses_and_rewrites_in_the_order_messages_came() -> None:
    async with (
        serving(screen=slow_filter) as srv,
        ws_connect(f"{srv.ws}?user=amy&room=general", **JSON) as amy,
        ws_connect(f"{srv.ws}?user=bo&room=general", **JSON) as bo,
    ):
        await welcome(amy)
        await welcome(bo)
        await amy.send(send("first", "1"))
        await amy.send(send("buy spam", "2"))
        await amy.send(send("what the heck", "3"))
        seen = await recv_until(amy, lambda e: e.get("id") == "3")
        replies = [(e["type"], e.get("id", e.get("ref"))) for e in seen]
        assert [r for r in replies if r[0] in ("ack", "error")] == [
            ("ack", "1"),
            ("error", "2"),
            ("ack", "3"),
        ]
        assert next(e for e in seen if e["type"] == "error")["code"] == "refused"
        got = await recv_until(bo, lambda e: e.get("text") == "what the h*ck")
        assert [e["text"] for e in got if e["type"] == "message"] == ["first", "what the h*ck"]


async def test_a_hook_that_raises_refuses_that_message_only() -> None:
    async with (
        serving(screen=broken) as srv,
        ws_connect(f"{srv.ws}?user=amy&room=general", **JSON) as amy,
    ):
        await welcome(amy)
        await amy.send(send("boom", "1"))
        await amy.send(send("fine", "2"))
        seen = await recv_until(amy, lambda e: e.get("id") == "2")
        errors = [e for e in seen if e["type"] == "error"]
        assert [(e["code"], e["ref"]) for e in errors] == [("refused", "1")]
        assert seen[-1]["type"] == "ack"
