"""The browser client in real headless Chromium against a real ``chatcore serve``.

What a person would notice: two people in one room see each other's messages;
when one of them loses the network, the page says it is reconnecting, and on
coming back (within the grace period) shows exactly the messages it missed, in
order, once each, and delivers what was typed while offline. Screenshots go to
``artifacts/browser/``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from websockets.sync.client import connect

if TYPE_CHECKING:
    from collections.abc import Callable

    from .conftest import NetworkLink

    Relay = Callable[[str], tuple[NetworkLink, str]]

WAIT_MS = 15_000  # a guard against hanging, not a timing assertion

SHOWN = """() => [...document.querySelectorAll('#messages .msg[data-offset]')].map(
  (li) => [Number(li.dataset.offset), li.dataset.from, li.querySelector('.text').textContent])"""


def shown(page: Any) -> list[tuple[int, str, str]]:
    """The messages the page shows in its open room: (offset, sender, text), top to bottom."""
    return [tuple(row) for row in page.evaluate(SHOWN)]


def open_chat(browser: Any, base: str, user: str, *rooms: str, dark: bool = False) -> Any:
    context = browser.new_context(
        viewport={"width": 1100, "height": 700}, color_scheme="dark" if dark else "light"
    )
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.errors = errors  # type: ignore[attr-defined]
    query = "&".join(f"room={r}" for r in rooms)
    page.goto(f"{base}/?user={user}&{query}")
    page.wait_for_function("window.__chatcore.connected")
    return page


def say(page: Any, text: str) -> None:
    page.fill("#text", text)
    page.press("#text", "Enter")


def wait_for_text(page: Any, text: str) -> None:
    page.locator("#messages .msg[data-offset] .text", has_text=text).first.wait_for()


def test_login_form_joins_the_room_and_two_pages_chat(
    browser: Any, server: str, artifacts: Path
) -> None:
    context = browser.new_context(viewport={"width": 1100, "height": 700})
    alice = context.new_page()
    alice.set_default_timeout(WAIT_MS)
    alice.goto(server + "/")
    alice.screenshot(path=artifacts / "login.png")
    alice.fill("#login-user", "alice")
    alice.fill("#login-room", "general")
    alice.click("#login-form button[type=submit]")
    alice.wait_for_function("window.__chatcore.connected")
    bob = open_chat(browser, server, "bob", "general", "random", dark=True)

    alice.locator("#member-list [data-user=bob]").wait_for()
    alice.locator("#messages .line", has_text="bob joined").wait_for()
    say(alice, "Hello Bob! How is the release going?")
    wait_for_text(bob, "How is the release going?")
    say(bob, "Almost there, the tests are green.")
    say(bob, "Shipping in ten minutes.")
    wait_for_text(alice, "Shipping in ten minutes")
    bob.type("#text", "one more thing")
    alice.locator("#typing", has_text="bob is typing").wait_for()
    alice.screenshot(path=artifacts / "chat-alice.png")
    bob.press("#text", "Enter")
    wait_for_text(alice, "one more thing")
    assert alice.locator("#typing").inner_text() == ""  # his message ends his typing
    bob.locator("#messages .seen", has_text="Seen by alice").wait_for()  # her read mark

    expected = [
        (1, "alice", "Hello Bob! How is the release going?"),
        (2, "bob", "Almost there, the tests are green."),
        (3, "bob", "Shipping in ten minutes."),
        (4, "bob", "one more thing"),
    ]
    assert shown(alice) == expected
    bob.locator("#messages .msg.pending").first.wait_for(state="detached")
    assert shown(bob) == expected
    assert bob.locator("#rooms [data-room=random] .badge").count() == 0  # nothing said there
    bob.screenshot(path=artifacts / "chat-bob-dark.png")
    assert not bob.errors  # type: ignore[attr-defined]


def test_page_offline_then_back_within_grace_sees_exactly_what_it_missed(
    browser: Any, server: str, relay: Relay, artifacts: Path
) -> None:
    link, via_relay = relay(server)
    alice = open_chat(browser, via_relay, "alice", "general")
    bob = open_chat(browser, server, "bob", "general")
    say(bob, "before the drop")
    wait_for_text(alice, "before the drop")
    session = alice.evaluate("window.__chatcore.state.session")

    # Wi-Fi goes: the connection dies without a close frame, and the browser is offline.
    link.cut()
    alice.context.set_offline(True)
    alice.locator("#banner", has_text="offline").wait_for()
    missed = [f"missed {i}" for i in range(1, 4)]
    for text in missed:
        say(bob, text)
    bob.locator("#messages .msg.pending").first.wait_for(state="detached")
    say(alice, "typed while offline")
    alice.locator("#messages .msg.pending", has_text="typed while offline").wait_for()
    alice.screenshot(path=artifacts / "offline-alice.png")

    # Back within the grace period: the same session resumes where it left off.
    link.restore()
    alice.context.set_offline(False)
    alice.wait_for_function("window.__chatcore.connected")
    wait_for_text(alice, "typed while offline")
    alice.locator("#banner").wait_for(state="hidden")
    wait_for_text(bob, "typed while offline")

    assert alice.evaluate("window.__chatcore.state.session") == session
    assert shown(alice) == [
        (1, "bob", "before the drop"),
        (2, "bob", "missed 1"),
        (3, "bob", "missed 2"),
        (4, "bob", "missed 3"),
        (5, "alice", "typed while offline"),
    ]
    assert [text for _, _, text in shown(bob)].count("typed while offline") == 1
    # for bob, alice never left the room
    assert bob.locator("#messages .line", has_text="alice left").count() == 0
    assert bob.locator("#member-list [data-user=alice]").count() == 1
    alice.screenshot(path=artifacts / "resumed-alice.png")
    assert not alice.errors  # type: ignore[attr-defined]


def seed(base: str, room: str, count: int) -> None:
    """Post ``note 1`` ... ``note N`` to ``room`` with the websockets library, in order."""
    url = base.replace("http", "ws", 1)
    for first in range(1, count + 1, 10):  # ten per session: the server's burst allowance
        batch = range(first, min(first + 10, count + 1))
        with connect(
            f"{url}/ws?user=seeder{first}&room={room}", subprotocols=["chatcore.v1"]
        ) as ws:
            for n in batch:
                ws.send(
                    json.dumps({"type": "send", "room": room, "text": f"note {n}", "id": f"n{n}"})
                )
            acked = 0
            while acked < len(batch):
                event = json.loads(ws.recv(timeout=10))
                assert event["type"] != "error", event
                acked += event["type"] == "ack"


def test_older_history_on_scrolling_up_and_unread_counts_per_room(
    browser: Any, server: str, artifacts: Path
) -> None:
    seed(server, "general", 60)
    bob = open_chat(browser, server, "bob", "random", "general")
    # What was said before bob came is history, not unread.
    bob.locator("#member-list [data-user=bob]").wait_for()  # drawn with the room list
    assert bob.locator("#rooms [data-room=general] .badge").count() == 0
    bob.click("#rooms [data-room=general]")
    # The newest page, then the rest when the reader scrolls to the top.
    bob.locator("#messages .msg[data-offset='60']").wait_for()
    assert [o for o, _, _ in shown(bob)] == list(range(11, 61))
    bob.evaluate("document.getElementById('scroller').scrollTop = 0")
    bob.locator("#messages .msg[data-offset='1']").wait_for()
    assert shown(bob) == [(n, f"seeder{(n - 1) // 10 * 10 + 1}", f"note {n}") for n in range(1, 61)]
    bob.locator("#history-state", has_text="beginning of #general").wait_for()

    alice = open_chat(browser, server, "alice", "random")
    for n in range(1, 4):
        say(alice, f"over here {n}")
    badge = bob.locator("#rooms [data-room=random] .badge")
    badge.filter(has_text="3").wait_for()
    assert bob.title().startswith("(3) ")
    bob.screenshot(path=artifacts / "unread-bob.png")
    bob.click("#rooms [data-room=random]")
    wait_for_text(bob, "over here 3")
    assert [t for _, _, t in shown(bob)] == ["over here 1", "over here 2", "over here 3"]
    bob.click("#rooms [data-room=general]")
    assert badge.count() == 0
    assert not bob.title().startswith("(")


def test_page_back_after_grace_period_fills_the_gap_from_history(
    browser: Any, short_grace_server: str, relay: Relay, artifacts: Path
) -> None:
    link, via_relay = relay(short_grace_server)
    alice = open_chat(browser, via_relay, "alice", "general")
    bob = open_chat(browser, short_grace_server, "bob", "general")
    say(bob, "before the drop")
    wait_for_text(alice, "before the drop")
    session = alice.evaluate("window.__chatcore.state.session")

    link.cut()
    alice.context.set_offline(True)
    bob.locator("#messages .line", has_text="alice left").wait_for()  # the session expired
    for n in range(1, 4):
        say(bob, f"missed {n}")
    wait_for_text(bob, "missed 3")

    link.restore()
    alice.context.set_offline(False)
    wait_for_text(alice, "missed 3")
    assert alice.evaluate("window.__chatcore.state.session") != session
    assert shown(alice) == [
        (1, "bob", "before the drop"),
        (2, "bob", "missed 1"),
        (3, "bob", "missed 2"),
        (4, "bob", "missed 3"),
    ]
    alice.locator("#messages .line", has_text="new session").wait_for()
    bob.locator("#messages .line", has_text="alice joined").wait_for()
    alice.screenshot(path=artifacts / "expired-alice.png")
    assert not alice.errors  # type: ignore[attr-defined]


def test_a_burst_over_the_rate_limit_arrives_complete_and_in_order(
    browser: Any, server: str
) -> None:
    alice = open_chat(browser, server, "alice", "general")
    bob = open_chat(browser, server, "bob", "general")
    lines = [f"line {n}" for n in range(1, 26)]  # the server takes 10 at once, then 10/s
    alice.evaluate(  # all typed and submitted in one go, faster than any hand
        """(lines) => { for (const line of lines) {
             document.getElementById('text').value = line;
             document.getElementById('composer').requestSubmit(); } }""",
        lines,
    )
    wait_for_text(bob, "line 25")
    assert [t for _, _, t in shown(bob)] == lines
    alice.locator("#messages .msg.pending").first.wait_for(state="detached")
    assert shown(alice) == shown(bob)


def test_a_message_typed_while_joining_a_room_is_sent_once_joined(
    browser: Any, server: str
) -> None:
    alice = open_chat(browser, server, "alice", "general")
    alice.evaluate(  # join an empty room (the server loads it first) and send at once
        """() => {
             document.getElementById('join-room').value = 'news';
             document.getElementById('join-form').requestSubmit();
             document.getElementById('text').value = 'first!';
             document.getElementById('composer').requestSubmit(); }"""
    )
    alice.locator("#messages .msg[data-offset='1']").wait_for()
    assert alice.locator("#messages .msg.failed").count() == 0
    assert shown(alice) == [(1, "alice", "first!")]
    assert alice.locator("#room-title").inner_text() == "#news"


def test_direct_messages_sent_while_away_are_waiting_unread(
    browser: Any, server: str, artifacts: Path
) -> None:
    url = server.replace("http", "ws", 1)
    with connect(f"{url}/ws?user=alice", subprotocols=["chatcore.v1"]) as ws:
        json.loads(ws.recv(timeout=10))  # welcome
        for n in (1, 2):
            ws.send(json.dumps({"type": "dm", "to": "dora", "text": f"call me {n}"}))
        acked = 0
        while acked < 2:
            event = json.loads(ws.recv(timeout=10))
            assert event["type"] != "error", event
            acked += event["type"] == "ack"
    # dora was never online: the conversation is there when she comes, unread.
    dora = open_chat(browser, server, "dora", "general")
    badge = dora.locator("#dms [data-room='dm:alice:dora'] .badge")
    badge.filter(has_text="2").wait_for()
    dora.screenshot(path=artifacts / "dm-waiting-dora.png")
    dora.click("#dms [data-room='dm:alice:dora']")
    wait_for_text(dora, "call me 2")
    assert [t for _, _, t in shown(dora)] == ["call me 1", "call me 2"]
    assert badge.count() == 0
    assert dora.errors == []  # type: ignore[attr-defined]
