"""A tiny adapter for tests: an engine and a real store, driven as a server drives them.

No sockets: what the engine delivers is kept per connection as event values,
every delivery is reported ``Written`` at once, and storage effects go to the
store in one ``execute`` per engine step (group commit), answers fed back.
"""

from __future__ import annotations

from collections import defaultdict, deque
from typing import TypeVar

from chatcore import (
    Ack,
    Close,
    Command,
    Config,
    Connect,
    Deliver,
    Engine,
    ErrorEvent,
    FetchHistory,
    History,
    Message,
    Ping,
    Pong,
    SeededIds,
    Send,
    ServerEvent,
    Welcome,
    Written,
)
from chatcore_store import HistoryStore, is_storage_effect

START = 1_795_000_000.0

E = TypeVar("E", bound=ServerEvent)


class Driver:
    def __init__(self, store: HistoryStore, *, seed: int = 0, history_window: int = 1000) -> None:
        config = Config(rate_burst=10_000, rate_per_second=10_000.0, history_window=history_window)
        self.engine = Engine(config, SeededIds(seed))
        self.store = store
        self.now = START
        self.events: dict[int, list[ServerEvent]] = defaultdict(list)
        self.closed: dict[int, Close] = {}
        self._conns = 0

    async def feed(self, command: Command) -> None:
        queue: deque[Command] = deque([command])
        for _ in range(100_000):
            if not queue:
                return
            effects = self.engine.handle(queue.popleft(), self.now)
            storage = []
            for effect in effects:
                if is_storage_effect(effect):
                    storage.append(effect)
                elif isinstance(effect, Deliver):
                    for conn in effect.to:
                        self.events[conn].append(effect.event)
                        queue.append(Written(conn=conn, frames=1, nbytes=effect.size))
                elif isinstance(effect, Close):
                    self.closed[effect.conn] = effect
                elif isinstance(effect, Ping):
                    queue.append(Pong(conn=effect.conn))
            if storage:
                queue.extend(await self.store.execute(storage))
        raise AssertionError("the engine did not settle")

    async def connect(self, user: str, *rooms: str) -> int:
        self._conns += 1
        await self.feed(Connect(conn=self._conns, user=user, rooms=rooms))
        return self._conns

    async def send(self, conn: int, room: str, text: str, client_id: str | None = None) -> None:
        self.now += 0.001
        await self.feed(Send(conn=conn, room=room, text=text, client_id=client_id))

    async def fetch(
        self, conn: int, room: str, before: int | None = None, limit: int = 50
    ) -> History:
        await self.feed(FetchHistory(conn=conn, room=room, before=before, limit=limit))
        return self.of(conn, History)[-1]

    def of(self, conn: int, kind: type[E]) -> list[E]:
        return [e for e in self.events[conn] if isinstance(e, kind)]

    def acks(self, conn: int) -> list[Ack]:
        return self.of(conn, Ack)

    def errors(self, conn: int) -> list[ErrorEvent]:
        return self.of(conn, ErrorEvent)

    def messages(self, conn: int) -> list[Message]:
        return self.of(conn, Message)

    def welcome(self, conn: int) -> Welcome:
        return self.of(conn, Welcome)[0]
