"""The interface every history store offers to adapters."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeGuard

from chatcore import Append, Command, Effect, LoadHistory, LoadRoom, SavePositions, SaveRoom

__all__ = ["HistoryStore", "StorageEffect", "is_storage_effect"]

StorageEffect = LoadRoom | Append | LoadHistory | SaveRoom | SavePositions
_STORAGE = (LoadRoom, Append, LoadHistory, SaveRoom, SavePositions)


def is_storage_effect(effect: Effect) -> TypeGuard[StorageEffect]:
    return isinstance(effect, _STORAGE)


class HistoryStore(Protocol):
    """What an adapter needs of a store.

    ``execute`` carries out a batch of storage effects in order, as one unit
    of durability where the store has transactions (group commit), and
    returns the answering commands in the same order. A failure of the
    database must come back as ``AppendFailed`` / ``HistoryFailed`` answers,
    not as an exception.
    """

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def execute(self, effects: Sequence[StorageEffect]) -> list[Command]: ...
