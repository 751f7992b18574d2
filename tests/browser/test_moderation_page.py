"""Moderation as a person sees it in the browser: deleted messages, being removed."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import GRACE, chat_server
from .test_browser import open_chat, say, shown, wait_for_text

TOKEN = "browser-admin-token"


@pytest.fixture
def admin_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("CHATCORE_ADMIN_TOKEN", TOKEN)  # chatcore serve's --admin-token default
    with chat_server(GRACE) as url:
        yield url


def admin(base: str, method: str, path: str, body: Any = None) -> int:
    data = None if body is None else json.dumps(body).encode()
    headers = {"authorization": f"Bearer {TOKEN}", "content-type": "application/json"}
    request = urllib.request.Request(base + path, data, headers, method=method)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=10) as resp:
        return int(resp.status)


def test_a_deleted_message_shows_deleted_and_a_removed_user_is_told(
    browser: Any, admin_server: str, artifacts: Path
) -> None:
    alice = open_chat(browser, admin_server, "alice", "general")
    bob = open_chat(browser, admin_server, "bob", "general")
    say(alice, "good morning")
    say(bob, "something I should not have said")
    say(alice, "carry on")
    wait_for_text(bob, "carry on")
    wait_for_text(alice, "something I should not")

    assert admin(admin_server, "DELETE", "/admin/rooms/general/messages/2") == 200
    for page in (alice, bob):
        page.locator("#messages .msg.deleted[data-offset='2']").wait_for()
        assert shown(page) == [
            (1, "alice", "good morning"),
            (2, "bob", "This message was deleted."),
            (3, "alice", "carry on"),
        ]
    carol = open_chat(browser, admin_server, "carol", "general")  # from history
    carol.locator("#messages .msg.deleted[data-offset='2']").wait_for()
    assert [row[2] for row in shown(carol)] == [
        "good morning",
        "This message was deleted.",
        "carry on",
    ]
    alice.screenshot(path=artifacts / "moderation-deleted.png")

    assert admin(admin_server, "POST", "/admin/users/bob/remove", {"reason": "spam"}) == 200
    banner = bob.locator("#banner", has_text="a moderator removed you from this server (spam)")
    banner.wait_for()
    bob.screenshot(path=artifacts / "moderation-removed.png")
    alice.locator("#messages .line", has_text="bob left").wait_for()
    for page in (alice, bob, carol):
        assert not page.errors
