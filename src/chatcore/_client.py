"""The client side of resuming: what a client remembers from the events it reads.

Every client (the Python client, the simulator, a bot) keeps, per room, the
highest offset it has seen, so that a reconnect can ask for exactly what it
missed (``offset=ROOM:N``). The rules live here once; docs/protocol.md
section 3 states them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["follow_offsets"]


def follow_offsets(offsets: dict[str, int], user: str, event: Mapping[str, Any]) -> None:
    """Update ``offsets`` (room -> last offset seen) from one decoded server event.

    A fresh ``welcome`` replaces them; a resumed one confirms them; ``members``
    starts a newly joined room; ``message`` and ``ack`` move a room forward;
    the client's own ``left`` forgets the room.
    """
    kind = event.get("type")
    if kind == "welcome":
        if not event.get("resumed"):
            offsets.clear()
        for room, position in event["rooms"].items():
            offsets[room] = position["offset"]
    elif kind == "members":
        offsets.setdefault(event["room"], event["offset"])
    elif kind in ("message", "ack"):
        room = event["room"]
        offsets[room] = max(offsets.get(room, 0), event["offset"])
    elif kind == "left" and event.get("user") == user:
        offsets.pop(event["room"], None)
