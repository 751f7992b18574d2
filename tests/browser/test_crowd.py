"""The browser's member list in a crowded room, in real Chromium against ``chatcore serve``.

Above 50 users a room tells comings and goings together in ``presence`` frames
(docs/protocol.md, "presence"), not one ``joined``/``left`` each. What a person
would notice: the page's member list and its count still show exactly who is in
the room as a crowd arrives and part of it leaves.
"""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any

from websockets.sync.client import connect

from .test_browser import open_chat

CROWD = 55  # with the page's own user: 56, past the 50 of presence_batch_above

LISTED = """() => [...document.querySelectorAll('#member-list [data-user]')].map(
  (li) => li.dataset.user)"""


def listed(page: Any) -> list[str]:
    return list(page.evaluate(LISTED))


def test_a_crowded_rooms_member_list_follows_its_presence_frames(browser: Any, server: str) -> None:
    page = open_chat(browser, server, "bob", "hall")
    base = server.replace("http://", "ws://")
    with contextlib.ExitStack() as stack:
        crowd = []
        for i in range(CROWD):
            url = f"{base}/ws?user=c{i:02d}&room=hall"
            # max_queue=None: these clients read nothing, and a full queue would stop
            # them reading the server's answer to their close.
            ws = stack.enter_context(connect(url, subprotocols=["chatcore.v1"], max_queue=None))
            crowd.append(ws)
            assert json.loads(ws.recv(timeout=10))["type"] == "welcome"
        everyone = sorted(["bob", *(f"c{i:02d}" for i in range(CROWD))])
        # c49..c54 came after the room passed 50 users: only a presence frame tells them.
        page.wait_for_function(
            f"() => document.querySelectorAll('#member-list [data-user]').length === {CROWD + 1}"
        )
        assert sorted(listed(page)) == everyone
        assert page.locator("#member-count").inner_text() == str(CROWD + 1)

        gone = [crowd.pop(0) for _ in range(3)]  # c00, c01, c02 close: 53 left, still a crowd
        for ws in gone:
            ws.close()
        page.wait_for_function(
            f"() => document.querySelectorAll('#member-list [data-user]').length === {CROWD - 2}"
        )
        assert sorted(listed(page)) == everyone[:1] + everyone[4:]  # bob, then c03..c54
        page.locator("#messages .line", has_text=re.compile(r"\bc00\b.* left$")).wait_for()
        assert not page.errors
