"""The engine host: one :class:`chatcore.Engine`, its history store and its timer.

:class:`EngineHost` is what every server that runs an engine needs, whatever
it speaks: it feeds commands in, carries the effects out (the connection
effects to a :class:`Transport`, the storage effects to the store), feeds the
store's answers back, keeps one timer re-armed from ``next_deadline()``, and
opens and closes the store. It owns no socket, no HTTP and no WebSocket: a
transport turns ``deliver``/``close``/``ping`` into bytes, and tells the host
what its connections do by feeding commands (``Connect``, ``Receive``,
``Drained``, ``Disconnected``...).

Errors: :meth:`EngineHost.feed` lets an exception out to its caller, who
knows whose command it was (a server ends that connection alone, close 1011).
Where no one connection is the cause (the timer, the store's answers, a
transport's ``Drained`` for many), an exception out of the engine is a bug of
the engine or of the host program: :meth:`EngineHost.feed_or_log` logs it at
CRITICAL with its traceback and drops that command, and the host goes on.
Ending the server instead would drop every session for one bad command, and
turn a bug that a peer can trigger into a way to stop the server.

Two optional hooks: ``record`` (a :class:`RecordFile`) writes every engine
call as a :class:`chatcore.Recorder` line, for ``chatcore replay``; and
``screen`` shows every client message to the host program before it is
appended (``Config.screen_messages``): a sync or async callable that takes a
:class:`chatcore.Screen` and returns its ``Screened`` verdict. Verdicts are
fed back in the order the messages came, one hook call at a time; a hook
that raises, answers something else, or answers a replacement the engine
refuses (empty, too long, starting with the encryption marker) refuses the
message (fail closed), logged. With neither hook, the host does no extra work.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractContextManager, asynccontextmanager
from typing import Protocol, TypeAlias, TypeGuard

import anyio
import anyio.abc
import anyio.lowlevel

from chatcore import (
    Appended,
    ClaimSession,
    Close,
    Command,
    Config,
    Deliver,
    Effect,
    Engine,
    HistoryLoaded,
    IdSource,
    LoadHistory,
    LoadRoom,
    LocalProtocolError,
    Message,
    Ping,
    RandomIds,
    Recorder,
    RoomHeld,
    RoomLoaded,
    RoomReleased,
    Screen,
    Screened,
    SessionGone,
    SessionParked,
    Share,
    UserHeld,
    UserReleased,
    Verdict,
)
from chatcore_store import (
    DurableStore,
    HistoryStore,
    InstantStore,
    MemoryStore,
    StorageEffect,
    StoreUnavailable,
    is_storage_effect,
)

from ._entropy import BufferedEntropy
from ._record import RecordFile
from ._tally import BusTally, HostTally

__all__ = ["Bus", "BusEffect", "EngineHost", "ScreenHook", "Transport"]

ScreenHook: TypeAlias = Callable[[Screen], Screened | Awaitable[Screened]]
"""The host program's message hook: ``screen.accept()``, ``screen.refuse(reason)``
or ``screen.replace(text)``, returned at once or awaited."""

log = logging.getLogger("chatcore_host")

_RETENTION_EVERY = 60.0
_AFTER_TIMER_FAILURE = 1.0  # seconds before a tick that raised is tried again (no spin)


class Transport(Protocol):
    """Where the host sends what concerns connections; the server implements it.

    Each method is called while the host carries out one engine call's
    effects, in the engine's order, and must not block or call back into the
    host (queue the bytes; write them at :meth:`end_turn`).
    """

    def deliver(self, to: tuple[int, ...], text: str) -> None:
        """Send ``text`` as one text frame to each connection in ``to`` (unknown ids:
        gone already, skip them). Report the frames back once written, with
        ``Written`` or ``Drained``: they count against the engine's outboxes."""
        ...

    def close(self, conn: int, code: int, reason: str) -> None:
        """Close ``conn`` with a close frame after what is queued for it. The engine
        has forgotten it already: do not feed ``Disconnected`` for it."""
        ...

    def ping(self, conn: int) -> None:
        """Send a ping to ``conn``; feed ``Pong`` when the answer comes."""
        ...

    def end_turn(self, *, nested: bool) -> None:
        """The effects of one engine call are carried out.

        ``nested`` is False when no :meth:`EngineHost.turn` is open any more:
        the time to write what was queued (at once, or soon). True while a
        turn goes on (the rest of one read, a store batch): a transport that
        coalesces writes waits, unless a queue grew so long that writing now
        keeps the engine's outbox from filling.
        """
        ...


BusEffect: TypeAlias = (
    RoomHeld
    | RoomReleased
    | UserHeld
    | UserReleased
    | Share
    | SessionParked
    | SessionGone
    | ClaimSession
)
"""The engine's effects a :class:`Bus` carries out (only with ``Config(cluster=True)``)."""


class Bus(Protocol):
    """What the host needs of a bus between processes sharing one log
    (:class:`chatcore_host.RedisBus` is one; docs/engine.md "Several processes").

    :meth:`publish` is called once per message this process appended, after the
    log stored it; :meth:`carry` for each of the engine's bus effects
    (``RoomHeld``, ``Share``, ``ClaimSession``...), in order. Neither may block
    (queue). :meth:`run` runs for as long as the host does and feeds what the
    other processes say through :meth:`EngineHost.bus_feed`.
    """

    tally: BusTally

    def publish(self, message: Message) -> None: ...

    def carry(self, effect: BusEffect) -> None: ...

    async def run(self, sink: EngineHost) -> None: ...

    async def ping(self) -> str | None:
        """None if the bus works, else why not (for ``/readyz``)."""
        ...


class EngineHost:
    """Runs one engine for a transport: commands in, effects out, timer, store.

    Feed commands with :meth:`feed`; run the host's tasks with
    ``async with host.running():`` (the timer, the store worker, retention),
    inside which the server serves. Commands fed inside one :meth:`turn`
    share one :meth:`Transport.end_turn`, so their writes coalesce.

    The store is run inline when it says it ``answers_at_once`` (its answers
    are fed back within the same call); any other store gets one worker task
    that hands it everything that piled up since its last batch (group
    commit) and feeds every answer back.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        config: Config | None = None,
        store: HistoryStore | None = None,
        ids: IdSource | None = None,
        retention_every: float = _RETENTION_EVERY,
        retain_messages: int | None = None,
        retain_age: float | None = None,
        screen: ScreenHook | None = None,
        record: RecordFile | None = None,
        bus: Bus | None = None,
    ) -> None:
        self.config = config or Config()
        self.bus = bus
        """Where this process's messages go to other processes sharing the log, if any."""
        if bus is not None and not self.config.cluster:
            self.config = dataclasses.replace(self.config, cluster=True)
        elif bus is None and self.config.cluster:
            raise ValueError("Config.cluster needs a bus")
        self.retention_every = retention_every
        """Seconds between passes that cut the store's rooms down to their retention limits."""
        if retain_messages is not None and retain_messages < 0:
            raise ValueError("retain_messages must not be negative")
        if retain_age is not None and not retain_age > 0:
            raise ValueError("retain_age must be more than 0 seconds")
        self.retain_messages = retain_messages
        """The newest messages a stored room keeps when it has no count limit of its own
        (None: all)."""
        self.retain_age = retain_age
        """Seconds a stored message is kept when its room has no age limit of its own
        (None: for ever)."""
        if screen is not None and not self.config.screen_messages:
            self.config = dataclasses.replace(self.config, screen_messages=True)
        elif screen is None and self.config.screen_messages:
            raise ValueError("Config.screen_messages needs a screen hook")
        # (The OS's random bytes, drawn 4 KiB at a time: see _entropy.)
        ids = ids or RandomIds(BufferedEntropy())
        # Every call into the engine goes through _handle and _tick: the engine's own
        # methods, or the recorder's when recording (one None check when not).
        self._record = record
        self._recorder: Recorder | None = None
        if record is None:
            self.engine = Engine(self.config, ids)
        else:
            self._recorder = Recorder(self.config, ids, record.write)
            self.engine = self._recorder.engine
        self._screen = screen
        self._screening: deque[tuple[Screen, Screened | Awaitable[Screened]]] = deque()
        self._screen_wake: anyio.Event | None = None
        self.store: HistoryStore = store if store is not None else MemoryStore()
        self.durable: DurableStore | None = (
            self.store if isinstance(self.store, DurableStore) else None
        )
        """The store's admin and maintenance calls, if it has them (retention, HTTP reads)."""
        self._transport = transport
        self._turns = 0
        self._turn = _Turn(self)
        # The one timer, a cancel scope whose deadline follows engine.next_deadline().
        self._timer: anyio.CancelScope | None = None
        self._armed: float | None = None
        # A store that answers at once runs inline; its answers wait here while
        # the call that asked is still carrying out effects.
        self._instant = self.store if _answers_at_once(self.store) else None
        self._answers: deque[Command] = deque()
        self._answering = False
        # The worker's next batch, and its wake-ups.
        self._storage: list[StorageEffect] = []
        self._storage_wake: anyio.Event | None = None
        self._storage_idle: anyio.Event | None = None
        self._storage_busy = False
        self._store_lock = anyio.Lock()
        self.tally = HostTally()
        """Deliveries, store latency and store failures, for metrics."""

    # -- feeding the engine -------------------------------------------------------------

    def turn(self) -> AbstractContextManager[None]:
        """Commands fed inside share one end of turn (their writes coalesce)."""
        return self._turn  # (one object, not a generator per read: every read opens one)

    def feed(self, command: Command) -> None:
        """Hand ``command`` to the engine and carry out its effects at once.

        An exception from the engine goes to the caller: whoever fed a
        connection's command decides what becomes of that connection.
        """
        now = time.time()
        effects = self._handle(command, now)
        if effects:
            self._run(effects, now)
        if self._turns:
            # The timer is re-armed once, when the turn ends: nothing runs in between.
            self._transport.end_turn(nested=True)
        else:
            self._transport.end_turn(nested=False)
            self._rearm()

    def feed_or_log(self, command: Command) -> None:
        """:meth:`feed` a command that no one connection is answerable for.

        An exception is a bug (in the engine or the host program): it is
        logged at CRITICAL with its traceback and the command is dropped.
        """
        try:
            self.feed(command)
        except Exception:
            log.critical(
                "engine bug: %s raised; the command is dropped",
                type(command).__name__,
                exc_info=True,
            )

    def _handle(self, command: Command, now: float) -> list[Effect]:
        if self._recorder is None:
            return self.engine.handle(command, now)
        return self._recorder.handle(command, now)

    def _tick(self, now: float) -> list[Effect]:
        if self._recorder is None:
            return self.engine.tick(now)
        return self._recorder.tick(now)

    def _run(self, effects: list[Effect], now: float) -> None:
        """Carry out one engine call's effects (made at ``now``)."""
        transport = self._transport
        storage: list[StorageEffect] = []
        screens: list[Screen] = []
        for effect in effects:
            match effect:
                case Deliver():
                    transport.deliver(effect.to, effect.data)
                    self.tally.deliveries += len(effect.to)
                case _ if is_storage_effect(effect):
                    # (Every message's Append, each session's inbox and positions come
                    # this way, and a class pattern that fails costs ~460 instructions.)
                    storage.append(effect)
                case Close():
                    transport.close(effect.conn, effect.code, effect.reason)
                case Ping():
                    transport.ping(effect.conn)
                case Screen():
                    screens.append(effect)
                case (
                    RoomHeld()
                    | RoomReleased()
                    | UserHeld()
                    | UserReleased()
                    | Share()
                    | SessionParked()
                    | SessionGone()
                    | ClaimSession()
                ):
                    if self.bus is not None:  # Config.cluster: there is one
                        self.bus.carry(effect)
                case _:
                    log.error("no adapter for effect %r; dropped", effect)
        if storage:
            self._store(storage, now)
        for screen in screens:  # after the step's own effects, as the store's answers
            self._ask_screen(screen, now)

    def _store(self, storage: list[StorageEffect], now: float) -> None:
        if self._instant is None:
            self._storage.extend(storage)
            if (wake := self._storage_wake) is not None:
                self._storage_wake = None
                wake.set()
            return
        started = time.perf_counter()
        answers = self._instant.execute_now(storage)
        self.tally.store_call(time.perf_counter() - started, answers)
        if self.bus is not None:
            self._publish(self.bus, answers)
        self._answer(answers, now)

    def _answer(self, answers: Sequence[Command], now: float) -> None:
        """Feed answers that came at once (a store's, a sync hook's), in order.

        They are fed at ``now``, the time of the engine call that asked: an answer
        that comes at once comes at the same instant (and costs no clock read).
        """
        self._answers.extend(answers)
        if self._answering:
            return  # the loop below, further up the stack, feeds them
        # A trampoline: answers that cause storage effects that are answered at once
        # are fed here in order, never by recursion.
        self._answering = True
        try:
            while self._answers:
                effects = self._handle_answer(self._answers.popleft(), now)
                if effects:
                    self._run(effects, now)
        finally:
            self._answering = False

    def _handle_answer(self, command: Command, now: float) -> list[Effect]:
        if type(command) is not Screened:
            return self._handle(command, now)
        try:
            return self._handle(command, now)
        except LocalProtocolError as exc:  # nothing changed: refuse instead
            return self._handle(_refused_instead(command, exc), now)

    # -- the bus -----------------------------------------------------------------------

    def _publish(self, bus: Bus, answers: Sequence[Command]) -> None:
        """Hand the bus every message the log just stored for this process (once each:
        a duplicate was published when it was first stored)."""
        for answer in answers:
            if type(answer) is Appended and answer.ref is not None and not answer.duplicate:
                bus.publish(answer.message)

    def bus_feed(self, commands: Sequence[Command]) -> None:
        """What other processes said, from the bus (their messages as ``Appended``
        without a ref, facts, claims, ``BusResumed``...): fed in order, in one turn,
        so their writes coalesce."""
        with self.turn():
            for command in commands:
                self.feed_or_log(command)

    # -- screening ----------------------------------------------------------------------

    def _ask_screen(self, screen: Screen, now: float) -> None:
        hook = self._screen
        if hook is None:  # screen_messages set after construction: refuse, do not hang
            self._answer([screen.refuse("no screening hook")], now)
            return
        try:
            verdict = hook(screen)
        except Exception:
            log.exception("screen hook raised; message refused")
            verdict = screen.refuse("message could not be screened")
        if not self._screening and not inspect.isawaitable(verdict):
            self._answer([_checked(screen, verdict)], now)
            return
        # An async verdict (or one queued behind it): the worker feeds them in order.
        self._screening.append((screen, verdict))
        if (wake := self._screen_wake) is not None:
            self._screen_wake = None
            wake.set()

    async def _screen_loop(self) -> None:
        while True:
            while not self._screening:
                wake = self._screen_wake = anyio.Event()
                await wake.wait()
            screen, pending = self._screening[0]
            verdict: object = pending
            if inspect.isawaitable(pending):
                try:
                    verdict = await pending
                except Exception:
                    log.exception("screen hook raised; message refused")
                    verdict = screen.refuse("message could not be screened")
            self._screening.popleft()
            answer = _checked(screen, verdict)
            try:
                self.feed(answer)
            except LocalProtocolError as exc:  # nothing changed: refuse instead
                self.feed_or_log(_refused_instead(answer, exc))

    # -- the timer ----------------------------------------------------------------------

    def _rearm(self) -> None:
        if self._timer is None:  # (not running, or the timer loop is in a tick)
            return
        deadline = self.engine.next_deadline()
        if deadline is None:
            return
        if self._armed is not None and deadline >= self._armed:
            return
        self._armed = deadline
        self._timer.deadline = anyio.current_time() + (deadline - time.time())

    async def _timer_loop(self) -> None:
        while True:
            with anyio.CancelScope() as scope:
                self._timer = scope
                self._armed = None
                self._rearm()
                await anyio.sleep_forever()
            self._timer = None
            try:
                with self.turn():
                    now = time.time()
                    effects = self._tick(now)
                    if effects:
                        self._run(effects, now)
            except Exception:
                log.critical(
                    "engine bug: tick raised; the timer tries again in %.0f s",
                    _AFTER_TIMER_FAILURE,
                    exc_info=True,
                )
                await anyio.sleep(_AFTER_TIMER_FAILURE)

    # -- running ------------------------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Open the store and run the timer, the store worker and retention.

        Serve inside the block. Leaving it hands the store what is still
        pending (up to 1.5 s) and closes it (up to 2 s), also when cancelled.
        A store that cannot be reached at start is logged, not fatal: stores
        reconnect on use and answer failures meanwhile.
        """
        try:
            await self.store.open()
        except StoreUnavailable as exc:
            log.error("history store unavailable at start (%s); will retry on use", exc.reason)
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self._timer_loop)
                tasks.start_soon(self._storage_loop)
                if self._screen is not None:
                    tasks.start_soon(self._screen_loop)
                if self.bus is not None:
                    tasks.start_soon(self.bus.run, self)
                if self.durable is not None:
                    tasks.start_soon(self._retention_loop, self.durable)
                yield
                with anyio.move_on_after(1.5):
                    await self._flush_storage()
                tasks.cancel_scope.cancel()
        finally:
            if self._record is not None:
                self._record.close()
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await self.store.close()

    # -- the store ----------------------------------------------------------------------

    async def _storage_loop(self) -> None:
        while True:
            while not self._storage:
                if (idle := self._storage_idle) is not None:
                    self._storage_idle = None
                    idle.set()
                wake = self._storage_wake = anyio.Event()
                await wake.wait()
            batch, self._storage = self._storage, []
            self._storage_busy = True
            async with self._store_lock:
                answers = await self._execute(batch)
            if self.bus is not None:
                self._publish(self.bus, answers)
            with self.turn():
                for answer in answers:
                    self.feed_or_log(answer)
            self._storage_busy = False
            # A store that answers at once must not starve the sockets.
            await anyio.lowlevel.checkpoint()

    async def _flush_storage(self) -> None:
        while self._storage or self._storage_busy:
            self._storage_idle = anyio.Event()
            await self._storage_idle.wait()

    async def _execute(self, batch: Sequence[StorageEffect]) -> list[Command]:
        started = time.perf_counter()
        try:
            answers = await self.store.execute(batch)
        except StoreUnavailable as exc:  # stores answer failures as commands; an old one may raise
            log.warning("history store unavailable: %s", exc.reason)
            answers = exc.answers
            self.tally.store_failures += not answers  # (failure answers are counted below)
        except Exception:
            log.exception("history store failed on a batch of %d effects", len(batch))
            answers = []
            self.tally.store_failures += 1
        self.tally.store_call(time.perf_counter() - started, answers)
        return answers

    async def _retention_loop(self, store: DurableStore) -> None:
        while True:
            await anyio.sleep(self.retention_every)
            try:
                # No store lock: the store serializes itself and lets batches in between chunks.
                if self.retain_messages is None and self.retain_age is None:
                    await store.apply_retention(time.time())  # a store without the defaults
                else:
                    await store.apply_retention(
                        time.time(),
                        default_messages=self.retain_messages,
                        default_age=self.retain_age,
                    )
            except StoreUnavailable as exc:
                log.warning("retention skipped: %s", exc.reason)
            except Exception:
                log.exception("retention failed; tried again in %.0f s", self.retention_every)

    # -- reads for HTTP (never fed to the engine) ---------------------------------------

    async def query_store(self, effects: Sequence[StorageEffect]) -> list[Command]:
        """Run read-only storage effects between the worker's batches.

        The answers go back to the caller, never to the engine.
        """
        async with self._store_lock:
            return await self._execute(effects)

    async def stored_room(self, room: str) -> tuple[bool, frozenset[str]] | None:
        """``(private, allow)`` of a stored room, None if unknown; raises StoreUnavailable."""
        if (durable := self.durable) is not None:
            info = await durable.room(room)
            return None if info is None else (info.private, info.allow)
        answers = await self.query_store([LoadRoom(room=room, recent=0)])
        meta = next((a for a in answers if isinstance(a, RoomLoaded)), None)
        return None if meta is None else (meta.private, meta.allow)

    async def history(self, room: str, *, before: int, limit: int) -> tuple[Message, ...]:
        """The newest ``limit`` stored messages of ``room`` below offset ``before``,
        oldest first; raises StoreUnavailable."""
        if (durable := self.durable) is not None:
            return await durable.history(room, before=before, limit=limit)
        answers = await self.query_store(
            [LoadHistory(ref=-1, room=room, after=0, before=before, limit=limit)]
        )
        loaded = next((a for a in answers if isinstance(a, HistoryLoaded)), None)
        if loaded is None:
            raise StoreUnavailable("history not available")
        return loaded.messages


class _Turn(AbstractContextManager[None]):
    """:meth:`EngineHost.turn`: reentrant, so one per host serves every turn."""

    __slots__ = ("_host",)

    def __init__(self, host: EngineHost) -> None:
        self._host = host

    def __enter__(self) -> None:
        self._host._turns += 1

    def __exit__(self, *exc: object) -> None:
        host = self._host
        host._turns -= 1
        if not host._turns:
            host._transport.end_turn(nested=False)
            host._rearm()


def _checked(screen: Screen, verdict: object) -> Screened:
    if isinstance(verdict, Screened) and verdict.ref == screen.ref:
        return verdict
    log.error("screen hook answered %r for ref %d; message refused", verdict, screen.ref)
    return screen.refuse("message could not be screened")


def _refused_instead(verdict: Screened, exc: LocalProtocolError) -> Screened:
    """A verdict the engine refused (a replacement that is empty, too long, or
    starts with the encryption marker) refuses the message: a broken filter
    fails closed, as one that raises does."""
    log.error("screen hook answered %r for ref %d (%s); message refused", verdict, verdict.ref, exc)
    return Screened(ref=verdict.ref, verdict=Verdict.REFUSE, reason="message could not be screened")


def _answers_at_once(store: HistoryStore) -> TypeGuard[InstantStore]:
    if not store.answers_at_once:
        return False
    if not callable(getattr(store, "execute_now", None)):
        raise TypeError(f"{type(store).__name__} answers_at_once but has no execute_now()")
    return True
