"""What the peer servers share: command line, URL parsing, the outgoing frame."""

from __future__ import annotations

import argparse
import json
import time
from urllib.parse import parse_qs, urlsplit


def parse_args(name: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.peers.{name}")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    return parser.parse_args()


def user_and_rooms(target: str) -> tuple[str, list[str]]:
    """The ``user`` and ``room`` parameters of a request target or query string."""
    query = urlsplit(target).query if "?" in target or "/" in target else target
    params = parse_qs(query)
    return params.get("user", ["anon"])[0], params.get("room", ["general"])


def message_json(room: str, sender: str, text: str) -> str:
    """The frame every member of ``room`` gets: encoded once per message."""
    return json.dumps(
        {
            "type": "message",
            "room": room,
            "from": sender,
            "text": text,
            "ts": int(time.time() * 1000),
        },
        separators=(",", ":"),
    )
