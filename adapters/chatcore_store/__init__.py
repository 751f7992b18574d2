"""History stores: the log that numbers, keeps and returns chat messages.

A store carries out the engine's storage effects (``LoadRoom``, ``Append``,
``LoadHistory``, ``SaveRoom``, ``SavePositions``) and answers with the
commands the engine expects back. :class:`MemoryStore` keeps everything in
this process; ``SQLiteStore`` (``chatcore_store.sqlite``, the default) and
``PostgresStore`` (``chatcore_store.postgres``, the ``postgres`` extra) keep
it in a database. :func:`open_store` picks one from a URL.
"""

from ._base import (
    DurableStore,
    HistoryStore,
    InstantStore,
    RoomInfo,
    StorageEffect,
    StoreUnavailable,
    is_storage_effect,
)
from ._open import DEFAULT_URL, create_room, list_rooms, open_store
from .memory import MemoryStore

__all__ = [
    "DEFAULT_URL",
    "DurableStore",
    "HistoryStore",
    "InstantStore",
    "MemoryStore",
    "RoomInfo",
    "StorageEffect",
    "StoreUnavailable",
    "create_room",
    "is_storage_effect",
    "list_rooms",
    "open_store",
]
