"""ChatApp's embedding API and screen hook, as ChatServer's, under uvicorn."""

from __future__ import annotations

import pytest

from chatcore import Screen, Screened
from chatcore_asgi import ChatApp
from conformance.wire import close_code, is_type, recv_until, send, welcome, ws_open

from .conftest import serve

pytestmark = pytest.mark.anyio


def no_commands(screen: Screen) -> Screened:
    if screen.text.startswith("!"):
        return screen.refuse("commands are for bots")
    return screen.accept()


async def test_a_host_program_posts_moderates_and_screens_through_chatapp() -> None:
    chat = ChatApp(screen=no_commands)
    async with serve("uvicorn", chat) as url:
        ws = url.replace("http", "ws", 1) + "/ws"
        async with ws_open(f"{ws}?user=alice&room=lobby") as alice:
            await welcome(alice)
            chat.post("lobby", "welcome, everyone", sender="bot")
            [*_, posted] = await recv_until(alice, is_type("message"))
            assert (posted["from"], posted["text"]) == ("bot", "welcome, everyone")
            await send(alice, type="send", room="lobby", text="!op me", id="c1")
            [*_, refused] = await recv_until(alice, is_type("error"))
            assert (refused["code"], refused["ref"]) == ("refused", "c1")
            chat.mute("lobby", "alice", 60, reason="cool down")
            await send(alice, type="send", room="lobby", text="hello?", id="c2")
            [*_, muted] = await recv_until(alice, is_type("error"))
            assert (muted["code"], muted["ref"]) == ("forbidden", "c2")
            chat.delete_message("lobby", posted["offset"])
            await recv_until(alice, is_type("deleted"))
            chat.remove("alice", reason="bye")
            await recv_until(alice, is_type("removed"))
            assert await close_code(alice) == 4003
