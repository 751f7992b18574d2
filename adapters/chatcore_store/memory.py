"""MemoryStore: the whole log in this process's memory, for tests and demos.

It behaves as the durable stores do (offsets, epochs, the exactly-once key on
``(room, sender, client_id)``, retention, outages) so that what a test proves
with it holds against SQLite or PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from chatcore import (
    Append,
    Appended,
    AppendFailed,
    Command,
    HistoryFailed,
    HistoryLoaded,
    LoadHistory,
    LoadRoom,
    Message,
    RoomLoaded,
    SavePositions,
    SaveRoom,
)

from ._base import StorageEffect

__all__ = ["MemoryStore"]


@dataclass
class _Room:
    epoch: str
    private: bool = False
    allow: frozenset[str] = frozenset()
    head: int = 0
    messages: list[Message] = field(default_factory=list)  # ascending offsets
    keys: dict[tuple[str, str], Message] = field(default_factory=dict)


class MemoryStore:
    """An in-process log. ``available = False`` simulates a database outage."""

    def __init__(self, *, epoch_prefix: str = "m", max_messages: int | None = None) -> None:
        self._rooms: dict[str, _Room] = {}
        self._epoch_prefix = epoch_prefix
        self._epochs = 0
        self.max_messages = max_messages
        self.positions: dict[tuple[str, str], tuple[int, int]] = {}
        self.available = True

    # -- the async face adapters use ------------------------------------------

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def execute(self, effects: Sequence[StorageEffect]) -> list[Command]:
        return self.execute_now(effects)

    # -- the sync face the simulator uses ----------------------------------------

    def execute_now(self, effects: Sequence[StorageEffect]) -> list[Command]:
        answers: list[Command] = []
        for effect in effects:
            answer = self._apply(effect)
            if answer is not None:
                answers.append(answer)
        return answers

    def messages(self, room: str) -> list[Message]:
        """Every stored message of ``room``, ascending (a copy)."""
        r = self._rooms.get(room)
        return [] if r is None else list(r.messages)

    def _room(self, name: str) -> _Room:
        room = self._rooms.get(name)
        if room is None:
            self._epochs += 1
            room = self._rooms[name] = _Room(epoch=f"{self._epoch_prefix}{self._epochs}")
        return room

    def _apply(self, effect: StorageEffect) -> Command | None:
        match effect:
            case Append():
                if not self.available:
                    return AppendFailed(ref=effect.ref, reason="store unavailable")
                return self._append(effect)
            case LoadRoom():
                room = self._room(effect.room)
                return RoomLoaded(
                    room=effect.room,
                    epoch=room.epoch,
                    head=room.head,
                    private=room.private,
                    allow=room.allow,
                    recent=tuple(room.messages[-effect.recent :]),
                )
            case LoadHistory():
                if not self.available:
                    return HistoryFailed(ref=effect.ref, reason="store unavailable")
                return HistoryLoaded(ref=effect.ref, messages=self._range(effect))
            case SaveRoom():
                room = self._room(effect.room)
                room.private, room.allow = effect.private, effect.allow
                return None
            case SavePositions():
                for p in effect.positions:
                    self.positions[effect.user, p.room] = (p.delivered, p.read)
                return None

    def _append(self, effect: Append) -> Appended:
        room = self._room(effect.room)
        if effect.client_id is not None:
            seen = room.keys.get((effect.sender, effect.client_id))
            if seen is not None:
                return Appended(message=seen, ref=effect.ref, duplicate=True)
        room.head += 1
        message = Message(
            room=effect.room,
            offset=room.head,
            epoch=room.epoch,
            sender=effect.sender,
            text=effect.text,
            ts=effect.ts,
            client_id=effect.client_id,
        )
        room.messages.append(message)
        if effect.client_id is not None:
            room.keys[effect.sender, effect.client_id] = message
        if self.max_messages is not None and len(room.messages) > self.max_messages:
            cut = len(room.messages) - self.max_messages
            for old in room.messages[:cut]:
                if old.client_id is not None:
                    room.keys.pop((old.sender, old.client_id), None)
            del room.messages[:cut]
        return Appended(message=message, ref=effect.ref)

    def _range(self, effect: LoadHistory) -> tuple[Message, ...]:
        room = self._rooms.get(effect.room)
        if room is None:
            return ()
        if not room.messages:
            return ()
        # Offsets are contiguous from the oldest kept message (retention cuts the front).
        first = room.messages[0].offset
        size = len(room.messages)
        lo = min(size, max(0, effect.after + 1 - first))
        hi = min(size, max(0, effect.before - first))
        if hi <= lo:
            return ()
        if effect.limit is not None:
            lo = max(lo, hi - effect.limit)
        return tuple(room.messages[lo:hi])
