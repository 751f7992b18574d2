"""MemoryStore: the whole log in this process's memory, for tests and demos.

It behaves as the durable stores do (offsets, epochs, the exactly-once key on
``(room, sender, client_id)``, retention, outages) so that what a test proves
with it holds against SQLite or PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from chatcore import (
    Append,
    Appended,
    ClaimedDevice,
    ClaimPrekeys,
    Command,
    DeleteStored,
    DeviceKeysStored,
    HeadsLoaded,
    HistoryLoaded,
    InboxLoaded,
    KeysFailed,
    LoadHeads,
    LoadHistory,
    LoadInbox,
    LoadRoom,
    Message,
    Prekey,
    PrekeysClaimed,
    RoomLoaded,
    SaveBan,
    SaveMute,
    SavePositions,
    SaveRoom,
    StoreDeviceKeys,
    dm_users,
    room_rule,
)

from ._base import (
    TOO_MANY_DEVICES,
    TOO_MANY_PREKEYS,
    RoomInfo,
    StorageEffect,
    failed,
    history_request,
    number_append,
)

__all__ = ["MemoryStore"]


@dataclass
class _Room:
    epoch: str
    private: bool = False
    allow: frozenset[str] = frozenset()
    head: int = 0
    messages: list[Message] = field(default_factory=list)  # ascending offsets
    keys: dict[tuple[str, str, str], Message] = field(default_factory=dict)
    """The exactly-once keys (room, sender, client id) of the kept messages."""
    max_messages: int | None = None
    max_age: float | None = None
    banned: set[str] = field(default_factory=set)
    muted: dict[str, float] = field(default_factory=dict)

    def cut(self, count: int) -> int:
        """Drop the ``count`` oldest messages and their exactly-once keys."""
        count = min(count, len(self.messages))
        for old in self.messages[:count]:
            if old.client_id is not None:
                self.keys.pop((old.room, old.sender, old.client_id), None)
        del self.messages[:count]
        return count


class MemoryStore:
    """An in-process log. ``available = False`` simulates a database outage.

    ``max_messages`` caps every room (applied on append); per-room limits set
    with :meth:`set_retention` are applied by :meth:`apply_retention`.

    ``max_position_users`` bounds the read positions kept (``SavePositions``,
    one row per user and room a session ended in): the positions of at most
    that many users, those saved longest ago forgotten first, as everything
    in this store is forgotten when the process ends. A database keeps every
    user's; this store is for one process, tests and demos, and a server with
    users coming and going for weeks must not grow with every name it saw.
    A forgotten user comes back as a new one: nothing read, no unread
    direct messages listed at connect. None keeps them all.
    """

    answers_at_once = True  # execute_now: no I/O, so a host runs it inline

    def __init__(
        self,
        *,
        epoch_prefix: str = "m",
        max_messages: int | None = None,
        max_position_users: int | None = 1000,
    ) -> None:
        if max_position_users is not None and max_position_users < 1:
            raise ValueError("max_position_users must be at least 1 (or None: no bound)")
        self._rooms: dict[str, _Room] = {}
        # user -> the direct-message rooms they are one of the two users of: a new
        # session's inbox look-up reads these, not every room of the log.
        self._dm_rooms: dict[str, list[str]] = {}
        self._epoch_prefix = epoch_prefix
        self._epochs = 0
        self.max_messages = max_messages
        self.max_position_users = max_position_users
        self.positions_by_key: dict[tuple[str, str], tuple[int, int]] = {}
        # user -> the rooms of their rows in positions_by_key, the user saved
        # longest ago first (a save moves the user to the end). A tuple: most
        # users have one or two rooms, and a set costs 216 B even then.
        self._position_rooms: dict[str, tuple[str, ...]] = {}
        # The key directory: user -> device -> (identity key, prekey id -> key).
        self.devices: dict[str, dict[str, tuple[str, dict[int, str]]]] = {}
        self.available = True

    # -- the async face adapters use ------------------------------------------

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def execute(self, effects: Sequence[StorageEffect]) -> list[Command]:
        return self.execute_now(effects)

    # -- admin and maintenance (the DurableStore calls) ------------------------------

    def _info(self, name: str, room: _Room) -> RoomInfo:
        return RoomInfo(
            name=name,
            private=room.private,
            allow=room.allow,
            epoch=room.epoch,
            head=room.head,
            stored=len(room.messages),
            max_messages=room.max_messages,
            max_age=room.max_age,
        )

    async def rooms(self) -> list[RoomInfo]:
        return [self._info(name, room) for name, room in sorted(self._rooms.items())]

    async def room(self, name: str) -> RoomInfo | None:
        room = self._rooms.get(name)
        return None if room is None else self._info(name, room)

    async def save_room(self, name: str, *, private: bool, allow: frozenset[str]) -> RoomInfo:
        self._apply(SaveRoom(room=name, private=private, allow=allow))
        return self._info(name, self._rooms[name])

    async def set_retention(
        self, name: str, *, max_messages: int | None = None, max_age: float | None = None
    ) -> None:
        room = self._room(name)
        room.max_messages, room.max_age = max_messages, max_age

    async def apply_retention(
        self, now: float, *, default_messages: int | None = None, default_age: float | None = None
    ) -> int:
        for limit in (default_messages, default_age):
            if limit is not None and limit < 0:
                raise ValueError("retention limits must not be negative")
        removed = 0
        for room in self._rooms.values():
            keep = default_messages if room.max_messages is None else room.max_messages
            if keep is not None and len(room.messages) > keep:
                removed += room.cut(len(room.messages) - keep)
            max_age = default_age if room.max_age is None else room.max_age
            if max_age is not None:
                oldest_kept = (now - max_age) * 1000
                stale = 0
                while stale < len(room.messages) and room.messages[stale].ts < oldest_kept:
                    stale += 1
                removed += room.cut(stale)
        return removed

    async def history(
        self, room: str, *, after: int = 0, before: int | None = None, limit: int | None = None
    ) -> tuple[Message, ...]:
        return self._range(history_request(room, after, before, limit))

    async def positions(self, user: str) -> dict[str, tuple[int, int]]:
        return {room: pos for (who, room), pos in self.positions_by_key.items() if who == user}

    # -- the sync face the simulator uses ----------------------------------------

    def execute_now(self, effects: Sequence[StorageEffect]) -> list[Command]:
        answers: list[Command] = []
        for effect in effects:
            answer = self._apply(effect)
            if answer is not None:
                answers.append(answer)
        return answers

    def lose(self, room: str) -> None:
        """The log lost ``room``'s data (a failover without its latest writes):
        the room starts a new life, with a new epoch and no messages."""
        self._epochs += 1
        old = self._rooms.get(room)
        fresh = _Room(epoch=f"{self._epoch_prefix}{self._epochs}")
        if old is not None:
            fresh.private, fresh.allow = old.private, old.allow
        else:
            self._index_dm(room)
        self._rooms[room] = fresh

    def messages(self, room: str) -> list[Message]:
        """Every stored message of ``room``, ascending (a copy)."""
        r = self._rooms.get(room)
        return [] if r is None else list(r.messages)

    def _room(self, name: str) -> _Room:
        room = self._rooms.get(name)
        if room is None:
            self._epochs += 1
            # New rooms are public, a direct-message room private to its two users.
            private, allow = room_rule(name, private=False, allow=frozenset())
            epoch = f"{self._epoch_prefix}{self._epochs}"
            room = self._rooms[name] = _Room(epoch=epoch, private=private, allow=allow)
            self._index_dm(name)
        return room

    def _index_dm(self, name: str) -> None:
        """A room new to the log: if it is a direct-message room, index it by user."""
        pair = dm_users(name)
        if pair is not None:
            for user in pair:
                self._dm_rooms.setdefault(user, []).append(name)

    def _apply(self, effect: StorageEffect) -> Command | None:
        # An outage fails what would touch the database's log; rooms and marks are kept.
        if not self.available and isinstance(
            effect, (Append, LoadHistory, LoadInbox, LoadHeads, StoreDeviceKeys, ClaimPrekeys)
        ):
            return failed(effect)
        # Tried top to bottom: what every message and every session brings first.
        match effect:
            case Append():
                return self._append(effect)
            case LoadInbox():
                return InboxLoaded(ref=effect.ref, rooms=self._inbox(effect))
            case SavePositions():
                self._save_positions(effect)
                return None
            case LoadRoom():
                room = self._room(effect.room)
                return RoomLoaded(
                    room=effect.room,
                    epoch=room.epoch,
                    head=room.head,
                    private=room.private,
                    allow=room.allow,
                    recent=tuple(room.messages[-effect.recent :]) if effect.recent > 0 else (),
                    banned=frozenset(room.banned),
                    muted=dict(room.muted),
                    reads={
                        user: read
                        for (user, name), (_, read) in self.positions_by_key.items()
                        if name == effect.room and read > 0
                    },
                )
            case LoadHistory():
                return HistoryLoaded(ref=effect.ref, messages=self._range(effect))
            case SaveRoom():
                room = self._room(effect.room)
                room.private, room.allow = room_rule(
                    effect.room, private=effect.private, allow=effect.allow
                )
                return None
            case SaveBan():
                room = self._room(effect.room)
                (room.banned.add if effect.banned else room.banned.discard)(effect.user)
                return None
            case SaveMute():
                room = self._room(effect.room)
                if effect.until is None:
                    room.muted.pop(effect.user, None)
                else:
                    room.muted[effect.user] = effect.until
                return None
            case DeleteStored():
                room = self._room(effect.room)
                i = effect.offset - room.messages[0].offset if room.messages else -1
                if 0 <= i < len(room.messages):
                    gone = room.messages[i] = replace(room.messages[i], text="", deleted=True)
                    if gone.client_id is not None:
                        room.keys[gone.room, gone.sender, gone.client_id] = gone
                return None
            case StoreDeviceKeys():
                return self._store_keys(effect)
            case ClaimPrekeys():
                return self._claim(effect)
            case LoadHeads():
                heads = {}
                for name in effect.rooms:
                    if (found := self._rooms.get(name)) is not None:
                        heads[name] = (found.head, found.epoch)
                return HeadsLoaded(ref=effect.ref, heads=heads)

    def _save_positions(self, effect: SavePositions) -> None:
        user = effect.user
        rooms = self._position_rooms.pop(user, ())
        for p in effect.positions:
            # Keep the furthest position: a late report never moves a mark back.
            key = (user, p.room)
            found = self.positions_by_key.get(key)
            if found is None:
                found = (0, 0)
                rooms += (p.room,)
            self.positions_by_key[key] = (max(found[0], p.delivered), max(found[1], p.read))
        self._position_rooms[user] = rooms  # the newest now
        bound = self.max_position_users
        while bound is not None and len(self._position_rooms) > bound:
            oldest = next(iter(self._position_rooms))
            for room in self._position_rooms.pop(oldest):
                del self.positions_by_key[oldest, room]

    def _store_keys(self, effect: StoreDeviceKeys) -> Command:
        devices = self.devices.setdefault(effect.user, {})
        found = devices.get(effect.device)
        if found is None and len(devices) >= effect.max_devices:
            return KeysFailed(ref=effect.ref, reason=TOO_MANY_DEVICES)
        stock = {} if found is None or found[0] != effect.identity else found[1]
        devices[effect.device] = (effect.identity, stock)
        new = {p.id: p.key for p in effect.prekeys if p.id not in stock}
        if len(stock) + len(effect.prekeys) > effect.max_prekeys:
            return KeysFailed(ref=effect.ref, reason=TOO_MANY_PREKEYS)
        stock.update(new)
        return DeviceKeysStored(ref=effect.ref, device=effect.device, stock=len(stock))

    def _claim(self, effect: ClaimPrekeys) -> Command:
        claimed = []
        for device, (identity, stock) in sorted(self.devices.get(effect.user, {}).items()):
            prekey = None
            if stock:
                key_id = min(stock)
                prekey = Prekey(id=key_id, key=stock.pop(key_id))
            claimed.append(
                ClaimedDevice(device=device, identity=identity, prekey=prekey, left=len(stock))
            )
        return PrekeysClaimed(ref=effect.ref, user=effect.user, devices=tuple(claimed))

    def _inbox(self, effect: LoadInbox) -> tuple[str, ...]:
        found = []
        for name in self._dm_rooms.get(effect.user, ()):
            room = self._rooms[name]
            read = self.positions_by_key.get((effect.user, name), (0, 0))[1]
            newest = room.messages[-1] if room.messages else None
            if room.head > read and (newest is None or newest.sender != effect.user):
                found.append((-1 if newest is None else -newest.ts, name))
        return tuple(name for _, name in sorted(found)[: effect.limit])

    def _append(self, effect: Append) -> Appended:
        room = self._room(effect.room)
        answer, message = number_append(effect, room.epoch, room.head, room.keys)
        if message is not None:
            room.head = message.offset
            room.messages.append(message)
            if self.max_messages is not None and len(room.messages) > self.max_messages:
                room.cut(len(room.messages) - self.max_messages)
        return answer

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
