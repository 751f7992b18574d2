"""The interface every history store offers to adapters, and what stores share.

Adapters need only :class:`HistoryStore`. Admin tools (``chatcore rooms``,
``chatcore history``) and servers that apply retention use the wider
:class:`DurableStore`, which the SQLite and PostgreSQL stores implement.

What a store does with a batch is written here once: how appends are
numbered (:func:`number_appends`, one at a time :func:`number_append`, which
:class:`~chatcore_store.MemoryStore` uses), what a failure is answered with
(:func:`failed`), and, in :class:`SQLStore`, the whole algorithm of the
database stores: one transaction per batch, runs of appends stored with a few
statements, one retry on a fresh connection, and the degraded batch that
answers what it still can. A database plugs in as an :class:`SQLDriver` that runs the
statements (``_sql``) the algorithm yields; it owns only its connection and
its schema.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable, Generator, Iterable, Sequence
from dataclasses import dataclass
from typing import (
    TYPE_CHECKING,
    Any,
    Protocol,
    Self,
    TypeGuard,
    TypeVar,
    get_args,
    runtime_checkable,
)

from chatcore import (
    Append,
    Appended,
    AppendFailed,
    ClaimedDevice,
    ClaimPrekeys,
    Command,
    DeleteStored,
    DeviceKeysStored,
    Effect,
    HeadsFailed,
    HeadsLoaded,
    HistoryFailed,
    HistoryLoaded,
    InboxFailed,
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
    RoomLoadFailed,
    SaveBan,
    SaveMute,
    SavePositions,
    SaveRoom,
    StoreDeviceKeys,
    room_rule,
)

from ._sql import Statement, Statements, allow_json

if TYPE_CHECKING:
    import anyio

__all__ = [
    "UNAVAILABLE",
    "DurableStore",
    "HistoryStore",
    "InstantStore",
    "RoomInfo",
    "SQLDriver",
    "SQLStore",
    "StorageEffect",
    "StoreUnavailable",
    "Work",
    "drive",
    "drive_async",
    "failed",
    "history_request",
    "is_storage_effect",
    "new_epoch",
    "number_append",
    "number_appends",
]

T = TypeVar("T")

UNAVAILABLE = "store unavailable"

StorageEffect = (
    LoadRoom
    | Append
    | LoadHistory
    | LoadInbox
    | SaveRoom
    | SavePositions
    | StoreDeviceKeys
    | ClaimPrekeys
    | SaveBan
    | SaveMute
    | DeleteStored
    | LoadHeads
)
_STORAGE = get_args(StorageEffect)  # for isinstance: the union is the one list

TOO_MANY_DEVICES = "too many devices"
TOO_MANY_PREKEYS = "too many prekeys in stock"


def is_storage_effect(effect: Effect) -> TypeGuard[StorageEffect]:
    return isinstance(effect, _STORAGE)


def group_appends(effects: Sequence[StorageEffect]) -> list[StorageEffect | list[Append]]:
    """The batch in order, each run of consecutive appends gathered in a list
    (a store can then store a run with a few statements, whatever its length)."""
    out: list[StorageEffect | list[Append]] = []
    for effect in effects:
        if isinstance(effect, Append):
            if out and isinstance(out[-1], list):
                out[-1].append(effect)
            else:
                out.append([effect])
        else:
            out.append(effect)
    return out


def number_appends(
    run: Sequence[Append],
    heads: dict[str, tuple[str, int]],
    stored: dict[tuple[str, str, str], Message],
) -> tuple[list[Appended], list[Message]]:
    """Number a run of appends, each as :func:`number_append` does. ``heads`` maps
    each room of the run to ``(epoch, head)``; both dicts are updated as the run
    goes. Returns the answers in order and the new messages, for the store to insert."""
    answers: list[Appended] = []
    new: list[Message] = []
    for a in run:
        epoch, head = heads[a.room]
        answer, message = number_append(a, epoch, head, stored)
        if message is not None:
            heads[a.room] = (epoch, message.offset)
            new.append(message)
        answers.append(answer)
    return answers, new


def number_append(
    a: Append, epoch: str, head: int, stored: dict[tuple[str, str, str], Message]
) -> tuple[Appended, Message | None]:
    """Give an append the offset after its room's ``head``, unless its ``(room,
    sender, client_id)`` is in ``stored`` (a retry: answered as a duplicate with
    the stored message, and no new message). A new message with a client id is
    added to ``stored``."""
    if a.client_id is None:
        key = None
    else:
        key = (a.room, a.sender, a.client_id)
        seen = stored.get(key)
        if seen is not None:
            return Appended(message=seen, ref=a.ref, duplicate=True), None
    message = Message(
        room=a.room,
        offset=head + 1,
        epoch=epoch,
        sender=a.sender,
        text=a.text,
        ts=a.ts,
        client_id=a.client_id,
    )
    if key is not None:
        stored[key] = message
    return Appended(message=message, ref=a.ref), message


def new_epoch() -> str:
    """A fresh epoch for a room that is created: random, so a log that was lost
    and started again can never be confused with the old one."""
    return secrets.token_hex(8)


class StoreUnavailable(Exception):
    """The database cannot be reached by an admin or maintenance call
    (``create_room``, ``list_rooms``, ``history``, ``apply_retention``...).

    ``execute`` never raises it: a failed ``LoadRoom`` is answered with
    ``RoomLoadFailed``, never with a made-up ``RoomLoaded`` (a new epoch and an
    empty room would be worse than a refused join). ``answers`` and
    ``unanswered`` stay empty with the stores in this package; they remain for
    adapters written when ``execute`` raised for an unanswerable ``LoadRoom``.
    """

    def __init__(
        self,
        reason: str,
        *,
        answers: Sequence[Command] = (),
        unanswered: Sequence[LoadRoom] = (),
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.answers = list(answers)
        self.unanswered = tuple(unanswered)


@dataclass(frozen=True, slots=True, kw_only=True)
class RoomInfo:
    """A room as the store keeps it. ``head`` is the highest offset ever assigned
    (retention never lowers it); ``stored`` is how many messages are kept."""

    name: str
    private: bool
    allow: frozenset[str]
    epoch: str
    head: int
    stored: int = 0
    max_messages: int | None = None
    max_age: float | None = None
    """Seconds."""


class HistoryStore(Protocol):
    """What an adapter needs of a store.

    ``execute`` carries out a batch of storage effects in order, as one unit
    of durability where the store has transactions (group commit), and
    returns the answering commands in the same order. A failure of the
    database must come back as ``AppendFailed`` / ``HistoryFailed`` /
    ``RoomLoadFailed`` / ``InboxFailed`` answers, not as an exception.

    Every ``Append``, ``LoadRoom``, ``LoadHistory`` and ``LoadInbox`` needs an
    answer: the engine waits for it (a connecting session gets no welcome
    until its rooms and its inbox are answered). ``SaveRoom`` and
    ``SavePositions`` have none.
    """

    answers_at_once: bool
    """True: the store does no I/O and is an :class:`InstantStore`; a host runs
    its ``execute_now`` inline, feeding the answers back within the same call."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def execute(self, effects: Sequence[StorageEffect]) -> list[Command]: ...


class InstantStore(HistoryStore, Protocol):
    """A store whose answers need no waiting (``answers_at_once`` is True)."""

    def execute_now(self, effects: Sequence[StorageEffect]) -> list[Command]: ...


@runtime_checkable
class DurableStore(HistoryStore, Protocol):
    """A store with admin and maintenance calls. Each raises
    :class:`StoreUnavailable` when the database cannot be reached."""

    async def rooms(self) -> list[RoomInfo]: ...

    async def room(self, name: str) -> RoomInfo | None: ...

    async def save_room(self, name: str, *, private: bool, allow: frozenset[str]) -> RoomInfo:
        """Create the room (new epoch) or change who may enter it."""
        ...

    async def set_retention(
        self, name: str, *, max_messages: int | None = None, max_age: float | None = None
    ) -> None:
        """Per-room limits (None: keep everything); applied by ``apply_retention``."""
        ...

    async def apply_retention(
        self, now: float, *, default_messages: int | None = None, default_age: float | None = None
    ) -> int:
        """Delete what the limits no longer keep; returns how many messages went.

        ``default_messages`` and ``default_age`` (seconds) are the server's
        limits for a room that has none of its own: a room's own
        ``max_messages`` replaces ``default_messages`` for it, its own
        ``max_age`` replaces ``default_age``. Works in small transactions, so
        appends to the same rooms go on meanwhile."""
        ...

    async def history(
        self, room: str, *, after: int = 0, before: int | None = None, limit: int | None = None
    ) -> tuple[Message, ...]:
        """Stored messages with ``after < offset < before``: the newest ``limit``, ascending."""
        ...

    async def positions(self, user: str) -> dict[str, tuple[int, int]]:
        """The user's (delivered, read) offsets per room."""
        ...


def history_request(
    room: str, after: int = 0, before: int | None = None, limit: int | None = None
) -> LoadHistory:
    """The ``LoadHistory`` a store's ``history()`` call answers (``before=None``: to the head)."""
    return LoadHistory(
        ref=0, room=room, after=after, before=2**62 if before is None else before, limit=limit
    )


def failed(effect: StorageEffect, reason: str = UNAVAILABLE) -> Command | None:
    """The answer to an effect the store could not carry out (None: it has none)."""
    match effect:
        case Append():
            return AppendFailed(ref=effect.ref, reason=reason)
        case LoadHistory():
            return HistoryFailed(ref=effect.ref, reason=reason)
        case LoadRoom():
            return RoomLoadFailed(room=effect.room, reason=reason)
        case LoadInbox():
            return InboxFailed(ref=effect.ref, reason=reason)
        case LoadHeads():
            return HeadsFailed(ref=effect.ref, reason=reason)
        case StoreDeviceKeys() | ClaimPrekeys():
            return KeysFailed(ref=effect.ref, reason=reason)
        case _:
            return None


# -- the database stores ------------------------------------------------------------

Rows = list[tuple[Any, ...]]
Work = Generator[Statement, Rows, T]
"""What the skeleton hands a driver: it yields statements, is sent each one's
rows, and returns its result. A driver runs one inside one transaction."""


class SQLDriver(Protocol):
    """One connection to one database, as :class:`SQLStore` drives it. The
    store calls it one call at a time (it holds a lock around each)."""

    statements: Statements
    errors: tuple[type[Exception], ...]
    """What the database raises when it fails (the store answers, never raises)."""
    unreachable: str
    """Says what ``open`` could not reach: ``cannot open chat.db``."""
    failed_commit_may_have_stored: bool
    """A COMMIT whose answer never came may have stored the batch: no retry then."""

    @property
    def connected(self) -> bool: ...

    async def open(self) -> None:
        """Accept calls from now on, and connect."""

    async def close(self) -> None:
        """Refuse calls from now on (``errors``), and disconnect."""

    async def connect(self) -> None:
        """Connect (and create or upgrade the schema) unless connected."""

    async def run(self, work: Work[T], *, write: bool = True) -> T:
        """Run ``work`` in one transaction (connecting first if needed); ``write``:
        one that writes, so SQLite takes its lock up front."""
        ...

    async def broken(self, exc: Exception) -> None:
        """A call failed with ``exc``: roll back, and drop the connection if it is
        of no more use."""


def _message(row: Sequence[Any]) -> Message:
    return Message(
        room=row[0],
        offset=row[1],
        epoch=row[2],
        sender=row[3],
        text=row[4],
        ts=row[5],
        client_id=row[6],
        deleted=bool(row[7]),
    )


def _each(statements: Iterable[Statement]) -> Work[Rows]:
    rows: Rows = []
    for statement in statements:
        rows += yield statement
    return rows


def drive(work: Work[T], execute: Callable[[Statement], Rows]) -> T:
    """Run ``work`` to its end, each statement it yields by ``execute``."""
    try:
        statement = next(work)
        while True:
            statement = work.send(execute(statement))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


async def drive_async(work: Work[T], execute: Callable[[Statement], Awaitable[Rows]]) -> T:
    """:func:`drive`, for a driver whose statements are awaited."""
    try:
        statement = next(work)
        while True:
            statement = work.send(await execute(statement))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


def _marking(work: Work[T], finished: list[bool]) -> Work[T]:
    """``work``, noting in ``finished`` that it ran to its end (what failed after
    that was the COMMIT)."""
    result = yield from work
    finished.append(True)
    return result


class SQLStore:
    """A history store in a SQL database, over the driver that reaches it.

    One ``execute`` batch is one transaction (group commit): every ``Appended``
    in its answer is committed, or none is. A run of appends costs a fixed
    handful of statements however long it is: read (and where the database
    has row locks, lock) the rooms' rows in name order, look up the client ids
    already stored, insert the new messages and move the heads. A batch that
    fails is tried once more on a fresh connection when the one it used went
    stale; then it is answered effect by effect: no ``Append`` of it is stored
    (``AppendFailed``), and each read is tried on its own (a read-only or
    locked file can still be read) until the database cannot even be reached.
    """

    def __init__(
        self, driver: SQLDriver, *, epochs: Callable[[], str], retention_chunk: int
    ) -> None:
        self._driver = driver
        self._sql = driver.statements
        self._epochs = epochs
        self._chunk = retention_chunk
        self._lock: anyio.Lock | None = None
        self._log = logging.getLogger(type(self).__module__)

    # -- life cycle ---------------------------------------------------------------

    async def open(self) -> None:
        """Connect, and create or upgrade the schema. Raises ``StoreUnavailable``
        if the database cannot be reached."""
        async with self._locked():
            try:
                await self._driver.open()
            except self._driver.errors as exc:
                raise StoreUnavailable(f"{self._driver.unreachable}: {exc}") from exc

    async def close(self) -> None:
        async with self._locked():
            await self._driver.close()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _locked(self) -> anyio.Lock:
        if self._lock is None:
            import anyio  # the memory store, without this class, needs no anyio

            self._lock = anyio.Lock()
        return self._lock

    # -- the adapter's face -----------------------------------------------------------

    async def execute(self, effects: Sequence[StorageEffect]) -> list[Command]:
        if not effects:
            return []
        async with self._locked():
            return await self._execute(effects)

    async def _execute(self, effects: Sequence[StorageEffect]) -> list[Command]:
        driver = self._driver
        for attempt in (1, 2):
            reused = driver.connected
            try:
                await driver.connect()
            except driver.errors as exc:
                await self._broken(exc)
                return await self._degraded(effects, reachable=False)
            finished: list[bool] = []
            try:
                return await driver.run(_marking(self._batch(effects), finished))
            except driver.errors as exc:
                await self._broken(exc)
                # A connection that went stale since the last batch (opened while the
                # file was read-only, or closed by a server restart) gets one more try
                # on a fresh one; not after a failed COMMIT that may have stored the
                # batch (a client's retry with its client id is a duplicate instead).
                if (
                    attempt == 2
                    or not reused
                    or driver.connected
                    or (finished and driver.failed_commit_may_have_stored)
                ):
                    break
        return await self._degraded(effects, reachable=True)

    async def _degraded(
        self, effects: Sequence[StorageEffect], *, reachable: bool
    ) -> list[Command]:
        """The batch failed: none of its appends is stored. Reads are tried one by
        one until the database cannot be reached (one failed connect per batch at
        most: an unreachable host costs its timeout each time)."""
        answers: list[Command] = []
        for effect in effects:
            if reachable and not isinstance(effect, Append):
                try:
                    await self._driver.connect()
                except self._driver.errors as exc:
                    await self._broken(exc)
                    reachable = False
                else:
                    try:
                        answer = await self._driver.run(
                            self._apply(effect),
                            write=not isinstance(effect, (LoadHistory, LoadInbox, LoadHeads)),
                        )
                    except self._driver.errors as exc:
                        await self._broken(exc)
                    else:
                        if answer is not None:
                            answers.append(answer)
                        continue
            answer = failed(effect)
            if answer is None:
                self._log.warning("%r lost %r", self, effect)
            else:
                answers.append(answer)
        return answers

    async def _broken(self, exc: Exception) -> None:
        self._log.warning("%r failed: %s", self, exc)
        await self._driver.broken(exc)

    # -- admin and maintenance ------------------------------------------------------

    async def _guarded(self, work: Work[T], *, write: bool = True) -> T:
        """Run ``work`` in a transaction; a database failure becomes StoreUnavailable."""
        async with self._locked():
            try:
                return await self._driver.run(work, write=write)
            except self._driver.errors as exc:
                await self._broken(exc)
                raise StoreUnavailable(f"{UNAVAILABLE}: {exc}") from exc

    async def rooms(self) -> list[RoomInfo]:
        return await self._guarded(self._rooms(None), write=False)

    async def room(self, name: str) -> RoomInfo | None:
        found = await self._guarded(self._rooms(name), write=False)
        return found[0] if found else None

    async def save_room(self, name: str, *, private: bool, allow: frozenset[str]) -> RoomInfo:
        def work() -> Work[RoomInfo]:
            yield from self._save_room(SaveRoom(room=name, private=private, allow=allow))
            return (yield from self._rooms(name))[0]

        return await self._guarded(work())

    async def set_retention(
        self, name: str, *, max_messages: int | None = None, max_age: float | None = None
    ) -> None:
        _check_limits(max_messages, max_age)
        age_ms = None if max_age is None else round(max_age * 1000)

        def work() -> Work[None]:
            yield from self._room_row(name)
            yield Statement(self._sql.set_retention, (max_messages, age_ms, name))

        await self._guarded(work())

    async def apply_retention(
        self, now: float, *, default_messages: int | None = None, default_age: float | None = None
    ) -> int:
        """Cut every room down to its limits (or the defaults), ``retention_chunk``
        messages per transaction; the database is released between chunks, so
        batches interleave."""
        _check_limits(default_messages, default_age)
        age_ms = None if default_age is None else round(default_age * 1000)
        now_ms = round(now * 1000)
        params = (default_messages, age_ms, now_ms, age_ms, default_messages, age_ms)
        cuts = await self._guarded(
            _each([Statement(self._sql.retention_cuts, params)]), write=False
        )
        deleted = 0
        for room, first, last in cuts:
            lo = first
            while first is not None and lo <= last:
                hi = min(last, lo + self._chunk - 1)
                done = Statement(self._sql.delete_range, (room, lo, hi), count=True)
                deleted += (await self._guarded(_each([done])))[0][0]
                lo = hi + 1
        return deleted

    async def history(
        self, room: str, *, after: int = 0, before: int | None = None, limit: int | None = None
    ) -> tuple[Message, ...]:
        request = history_request(room, after, before, limit)
        return await self._guarded(self._range(request), write=False)

    async def positions(self, user: str) -> dict[str, tuple[int, int]]:
        rows = await self._guarded(_each([Statement(self._sql.positions, (user,))]), write=False)
        return {r[0]: (r[1], r[2]) for r in rows}

    # -- the work: what a batch asks of the database -------------------------------

    def _batch(self, effects: Sequence[StorageEffect]) -> Work[list[Command]]:
        answers: list[Command] = []
        for run in group_appends(effects):
            if isinstance(run, list):
                answers.extend((yield from self._append_run(run)))
            elif (answer := (yield from self._apply(run))) is not None:
                answers.append(answer)
        return answers

    def _apply(self, effect: StorageEffect) -> Work[Command | None]:
        sql = self._sql
        match effect:
            case Append():
                return (yield from self._append_run([effect]))[0]
            case LoadRoom():
                epoch, head, private, allow = yield from self._room_row(effect.room)
                recent: Rows = []
                if effect.recent > 0:
                    recent = yield Statement(sql.recent, (effect.room, effect.recent))
                moderation = yield Statement(sql.moderation, (effect.room,))
                reads = yield Statement(sql.room_reads, (effect.room,))
                return RoomLoaded(
                    room=effect.room,
                    epoch=epoch,
                    head=head,
                    private=private,
                    allow=allow,
                    recent=tuple(_message(r) for r in reversed(recent)),
                    banned=frozenset(r[0] for r in moderation if r[1]),
                    muted={r[0]: r[2] / 1000 for r in moderation if r[2] is not None},
                    reads={r[0]: r[1] for r in reads},
                )
            case LoadHistory():
                return HistoryLoaded(ref=effect.ref, messages=(yield from self._range(effect)))
            case LoadInbox():
                params = [effect.user] * sql.inbox_user_marks + [effect.limit]
                rows = yield Statement(sql.inbox, params)
                return InboxLoaded(ref=effect.ref, rooms=tuple(r[0] for r in rows))
            case SaveRoom():
                yield from self._save_room(effect)
                return None
            case SaveBan():
                yield Statement(sql.save_ban, (effect.room, effect.user, effect.banned))
                yield Statement(sql.forget_moderation, (effect.room, effect.user))
                return None
            case SaveMute():
                until = None if effect.until is None else int(effect.until * 1000)
                yield Statement(sql.save_mute, (effect.room, effect.user, until))
                yield Statement(sql.forget_moderation, (effect.room, effect.user))
                return None
            case DeleteStored():
                yield Statement(sql.delete_message, (effect.room, effect.offset))
                return None
            case SavePositions():
                rows = [(effect.user, p.room, p.delivered, p.read) for p in effect.positions]
                if rows:
                    yield Statement(sql.save_positions, rows, many=True)
                return None
            case StoreDeviceKeys():
                return (yield from self._store_keys(effect))
            case ClaimPrekeys():
                return (yield from self._claim(effect))
            case LoadHeads():
                rows = yield from _each(sql.read_heads(effect.rooms))
                return HeadsLoaded(
                    ref=effect.ref, heads={name: (head, epoch) for name, epoch, head in rows}
                )

    # -- the key directory (end-to-end encryption) ------------------------------------

    def _store_keys(self, effect: StoreDeviceKeys) -> Work[Command]:
        """The device's identity key, and its new prekeys added, within the bounds."""
        sql = self._sql
        user, device = effect.user, effect.device
        found = yield Statement(sql.device_identity, (user, device))
        if not found:
            count = yield Statement(sql.device_count, (user,))
            if count[0][0] >= effect.max_devices:
                return KeysFailed(ref=effect.ref, reason=TOO_MANY_DEVICES)
        elif found[0][0] != effect.identity:  # a new identity: the old prekeys go with the old
            yield Statement(sql.drop_prekeys, (user, device))
        yield Statement(sql.save_device, (user, device, effect.identity))
        stock = (yield Statement(sql.prekey_count, (user, device)))[0][0]
        if stock + len(effect.prekeys) > effect.max_prekeys:
            return KeysFailed(ref=effect.ref, reason=TOO_MANY_PREKEYS)
        rows = [(user, device, p.id, p.key) for p in effect.prekeys]
        if rows:
            yield Statement(sql.save_prekeys, rows, many=True)
        stock = (yield Statement(sql.prekey_count, (user, device)))[0][0]
        return DeviceKeysStored(ref=effect.ref, device=device, stock=stock)

    def _claim(self, effect: ClaimPrekeys) -> Work[Command]:
        """One prekey of each device, deleted and returned by one statement: a
        prekey two claims race for is deleted, so returned, by one of them."""
        sql = self._sql
        taken = yield Statement(sql.claim_prekeys, (effect.user,) * sql.claim_user_marks)
        by_device = {device: Prekey(id=key_id, key=key) for device, key_id, key in taken}
        devices = yield Statement(sql.devices, (effect.user,))
        left: dict[str, int] = dict((yield Statement(sql.stock, (effect.user,))))
        return PrekeysClaimed(
            ref=effect.ref,
            user=effect.user,
            devices=tuple(
                ClaimedDevice(
                    device=device,
                    identity=identity,
                    prekey=by_device.get(device),
                    left=left.get(device, 0),
                )
                for device, identity in devices
            ),
        )

    def _room_row(self, name: str) -> Work[tuple[str, int, bool, frozenset[str]]]:
        """(epoch, head, private, allow) of the room, creating it if new."""
        row = yield Statement(self._sql.room, (name,))
        if not row:
            yield from self._create_rooms([name])
            row = yield Statement(self._sql.room, (name,))
            if not row:  # pragma: no cover - inserted just now, or by another server
                raise RuntimeError(f"room {name!r} is missing after it was created")
        epoch, head, private, allow = row[0]
        return epoch, head, bool(private), self._sql.dialect.read_allow(allow)

    def _create_rooms(self, names: Sequence[str]) -> Work[None]:
        """New rooms are public, a direct-message room private to its two users;
        a room another server created meanwhile stays as it is."""
        rows = []
        for name in names:
            private, allow = room_rule(name, private=False, allow=frozenset())
            rows.append((name, self._epochs(), private, allow_json(allow)))
        yield self._sql.create_rooms(rows)

    def _save_room(self, effect: SaveRoom) -> Work[None]:
        private, allow = room_rule(effect.room, private=effect.private, allow=effect.allow)
        params = (effect.room, private, allow_json(allow), self._epochs())
        yield Statement(self._sql.save_room, params)

    def _append_run(self, run: list[Append]) -> Work[list[Appended]]:
        """Store consecutive appends: each room's row read once (in name order, so
        two servers locking the same rooms never deadlock), the messages inserted
        and each head moved with one statement each."""
        sql = self._sql
        names = sorted({a.room for a in run})
        heads = yield from self._heads(names)
        missing = [n for n in names if n not in heads]
        if missing:
            yield from self._create_rooms(missing)
            heads.update((yield from self._heads(missing)))
        keys = list(
            dict.fromkeys((a.room, a.sender, a.client_id) for a in run if a.client_id is not None)
        )
        stored: dict[tuple[str, str, str], Message] = {}
        if keys:
            for row in (yield from _each(sql.stored(keys))):
                stored[row[0], row[3], row[6]] = _message(row)
        answers, new = number_appends(run, heads, stored)
        if new:
            rows = [(m.room, m.offset, m.epoch, m.sender, m.text, m.ts, m.client_id) for m in new]
            yield sql.insert_messages(rows)
            moved = sorted({m.room for m in new})
            yield from _each(sql.move_heads([(name, heads[name][1]) for name in moved]))
        return answers

    def _heads(self, names: Sequence[str]) -> Work[dict[str, tuple[str, int]]]:
        """(epoch, head) of those rooms that exist."""
        rows = yield from _each(self._sql.heads(names))
        return {name: (epoch, head) for name, epoch, head in rows}

    def _range(self, effect: LoadHistory) -> Work[tuple[Message, ...]]:
        limit = self._sql.dialect.no_limit if effect.limit is None else max(0, effect.limit)
        params = (effect.room, effect.after, effect.before, limit)
        rows = yield Statement(self._sql.range, params)
        return tuple(_message(r) for r in reversed(rows))

    def _rooms(self, name: str | None) -> Work[list[RoomInfo]]:
        sql = self._sql
        rows = yield (Statement(sql.rooms) if name is None else Statement(sql.one_room, (name,)))
        return [
            RoomInfo(
                name=r[0],
                private=bool(r[1]),
                allow=sql.dialect.read_allow(r[2]),
                epoch=r[3],
                head=r[4],
                max_messages=r[5],
                max_age=None if r[6] is None else r[6] / 1000,
                stored=r[7],
            )
            for r in rows
        ]


def _check_limits(max_messages: int | None, max_age: float | None) -> None:
    if max_messages is not None and max_messages < 0:
        raise ValueError("max_messages must not be negative")
    if max_age is not None and max_age < 0:
        raise ValueError("max_age must not be negative")
