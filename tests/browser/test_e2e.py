"""End-to-end encrypted direct messages between two real Chromium pages, and a
Python client, through a real ``chatcore serve`` with a SQLite file.

What a person would notice: Alice and Bob open their conversation, each page
makes its keys (WebCrypto X25519, kept in IndexedDB), Alice writes, Bob's page
shows her words with a lock; Bob answers and Alice reads it. A Python client
that is Bob too (a second device) reads the same message. Bob's database file
holds neither sentence. A page that came after the message says it cannot
decrypt it.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import anyio

from chatcore_server.client import connect

from .conftest import GRACE, chat_server
from .test_browser import open_chat, say, wait_for_text

ROOM = "dm:alice:bob"
PUBLISHED = "() => window.__chatcore.e2e.published"


class PythonBob(threading.Thread):
    """Bob's Python client, a device of his beside his page, in a thread of its own:
    publishes its keys, then keeps the first message it reads in the conversation."""

    def __init__(self, base: str, keys: Path) -> None:
        super().__init__(daemon=True)
        self.url = base.replace("http", "ws", 1) + "/ws"
        self.keys = keys
        self.ready = threading.Event()
        self.got: dict[str, Any] | None = None
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            anyio.run(self._main)
        except BaseException as exc:  # shown by the assertion that finds nothing read
            self.failure = exc

    async def _main(self) -> None:
        async with connect(self.url, user="bob", rooms=[ROOM]) as bob:
            await bob.enable_e2e(self.keys)
            with anyio.fail_after(30):
                async for event in bob:
                    if event.get("type") == "keys_published":
                        self.ready.set()
                    elif event.get("room") == ROOM and event.get("type") == "message":
                        self.got = event
                        return


def test_two_pages_exchange_an_encrypted_dm_the_server_cannot_read(
    browser: Any, tmp_path: Path
) -> None:
    db = tmp_path / "chat.db"
    first, second = "meet me by the blue door", "I will bring the lantern"
    with chat_server(GRACE, "--db", f"sqlite:///{db}") as base:
        alice = open_chat(browser, base, "alice", ROOM)
        bob = open_chat(browser, base, "bob", ROOM)
        alice.wait_for_function(PUBLISHED)
        bob.wait_for_function(PUBLISHED)
        python_bob = PythonBob(base, tmp_path / "bob-python.json")
        python_bob.start()
        assert python_bob.ready.wait(20)

        say(alice, first)
        wait_for_text(bob, first)
        assert bob.locator(".msg.encrypted .lock").count() >= 1
        # The Python client reads what WebCrypto sealed: one scheme on both sides.
        python_bob.join(30)
        assert python_bob.got is not None, python_bob.failure
        assert (python_bob.got["text"], python_bob.got["encrypted"]) == (first, True)
        say(bob, second)
        wait_for_text(alice, second)
        assert alice.locator(".msg.encrypted", has_text=second).count() == 1

        # A page of a new device (a fresh browser profile) cannot read what came before.
        late = open_chat(browser, base, "bob", ROOM)
        late.wait_for_function(PUBLISHED)
        late.locator(
            ".msg.undecryptable", has_text="Cannot decrypt on this device"
        ).first.wait_for()
        assert first not in late.inner_text("#messages")

        for page in (alice, bob, late):
            assert page.errors == []
            page.context.close()
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("chat.db*"))
    assert stored.count(b"\x01e2e:") >= 2  # the messages are there, sealed
    for sentence in (first, second):
        assert sentence.encode() not in stored
