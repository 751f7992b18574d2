"""The server's message hook over real sockets: sync or async, and one that fails."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import anyio
import pytest

from chatcore import Screen, Screened
from chatcore_sim import Simulation

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


def misuses_replace(screen: Screen) -> Screened:
    """Replacements the engine refuses: the encryption marker, nothing at all."""
    if screen.text == "forge":
        return screen.replace("\x01e2e:" + json.dumps({"v": 1, "device": "d"}))
    if screen.text == "blank":
        return screen.replace("")
    return screen.accept()


async def async_misuses_replace(screen: Screen) -> Screened:
    await anyio.sleep(0)
    return misuses_replace(screen)


@pytest.mark.parametrize("hook", [misuses_replace, async_misuses_replace])
async def test_a_replacement_the_engine_refuses_fails_closed(hook: Any) -> None:
    async with (
        serving(screen=hook) as srv,
        ws_connect(f"{srv.ws}?user=amy&room=general", **JSON) as amy,
        ws_connect(f"{srv.ws}?user=bo&room=general", **JSON) as bo,
    ):
        await welcome(amy)
        await welcome(bo)
        await amy.send(send("forge", "1"))
        await amy.send(send("blank", "2"))
        await amy.send(send("fine", "3"))
        seen = await recv_until(amy, lambda e: e.get("id") == "3")
        replies = [(e["type"], e.get("code"), e.get("id", e.get("ref"))) for e in seen]
        assert [r for r in replies if r[0] in ("ack", "error")] == [
            ("error", "refused", "1"),
            ("error", "refused", "2"),
            ("ack", None, "3"),
        ]
        got = await recv_until(bo, lambda e: e.get("text") == "fine")
        assert [e["text"] for e in got if e["type"] == "message"] == ["fine"]


def load_example() -> Any:
    path = Path(__file__).resolve().parents[2] / "examples" / "moderation.py"
    spec = importlib.util.spec_from_file_location("moderation_example", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_moderation_example_filters_refuses_and_routes_commands() -> None:
    moderate = load_example().moderate
    sim = Simulation(seed=1, screen=moderate)
    amy = sim.connect("amy", room="general")
    bo = sim.connect("bo", room="general")
    amy.send("oh heck, Darn it", id="1")
    amy.send("WHY IS NOBODY HERE", id="2")
    amy.send("/roll", id="3")
    amy.send("/kick bo", id="4")
    texts = bo.texts()
    assert texts[0] == "oh ****, **** it"
    assert texts[1].startswith("amy rolls a die: ")
    assert len(texts) == 2
    assert [(e["ref"], e["code"]) for e in amy.of_type("error")] == [
        ("2", "refused"),
        ("4", "refused"),
    ]
