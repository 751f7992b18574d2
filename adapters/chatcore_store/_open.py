"""Choosing a store from a URL, and the admin calls embedding programs use.

Owns the ``--db`` URL syntax; it knows each store's constructor and nothing
of their SQL.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from chatcore import SaveRoom, is_valid_name, is_valid_room

from ._base import DurableStore, HistoryStore, RoomInfo
from .memory import MemoryStore

if TYPE_CHECKING:
    from .postgres import PostgresStore

__all__ = ["DEFAULT_URL", "create_room", "list_rooms", "open_store"]

DEFAULT_URL = "sqlite:///chatcore.db"
"""What ``chatcore serve`` uses without ``--db``: a file in the working directory."""


def open_store(url: str) -> HistoryStore:
    """The store a URL names, not yet opened (``await store.open()``, or ``async with``).

    * ``memory``: :class:`MemoryStore`, gone when the process ends;
    * ``sqlite:///chatcore.db`` (relative), ``sqlite:////var/lib/chat.db``
      (absolute), or a plain path: :class:`SQLiteStore` on that file;
    * ``sqlite://:memory:``: SQLite in this process's memory;
    * ``postgresql://user@host:port/db?schema=name``: :class:`PostgresStore`
      (``schema`` defaults to ``chatcore``; other parameters go to libpq).

    Raises ``ValueError`` for a URL it does not understand.
    """
    if url in ("memory", "memory:", "memory://"):
        return MemoryStore()
    if url.startswith("sqlite:"):
        from .sqlite import SQLiteStore

        rest = url.removeprefix("sqlite:")
        if rest in ("", "//", "///"):
            raise ValueError(f"no path in {url!r}; use sqlite:///chatcore.db")
        if rest in ("//:memory:", "///:memory:", ":memory:"):
            return SQLiteStore(":memory:")
        if not rest.startswith("///"):
            raise ValueError(
                f"bad SQLite URL {url!r}: use sqlite:///relative/path or sqlite:////absolute/path"
            )
        return SQLiteStore(rest.removeprefix("///"))
    if url.startswith(("postgresql://", "postgres://")):
        return _postgres(url)
    if "://" in url:
        raise ValueError(f"unknown store URL {url!r} (memory, sqlite:///..., postgresql://...)")
    from .sqlite import SQLiteStore

    return SQLiteStore(url)


def _postgres(url: str) -> PostgresStore:
    from .postgres import DEFAULT_SCHEMA, PostgresStore

    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schema = DEFAULT_SCHEMA
    rest = []
    for key, value in query:
        if key == "schema":
            schema = value
        else:
            rest.append((key, value))
    conninfo = urlunsplit(parts._replace(query=urlencode(rest)))
    return PostgresStore(conninfo, schema=schema)


async def create_room(
    store: HistoryStore, name: str, *, private: bool = True, allow: Iterable[str] = ()
) -> RoomInfo | None:
    """Create a room, or change an existing one's privacy and allow list.

    Raises ``ValueError`` for an invalid room or user name, and
    ``StoreUnavailable`` if the database cannot be reached. Returns the room as
    stored (None for a store without admin calls). A server already running
    learns of the change when it next loads the room; to apply it at once,
    feed ``chatcore.CreateRoom`` to its engine instead.
    """
    allowed = frozenset(allow)
    if not is_valid_room(name):
        raise ValueError(f"invalid room name {name!r}")
    bad = sorted(u for u in allowed if not is_valid_name(u))
    if bad:
        raise ValueError(f"invalid user names in allow list: {bad!r}")
    if isinstance(store, DurableStore):
        return await store.save_room(name, private=private, allow=allowed)
    await store.execute([SaveRoom(room=name, private=private, allow=allowed)])
    return None


async def list_rooms(store: HistoryStore) -> list[RoomInfo]:
    """Every room the store knows, by name."""
    if isinstance(store, DurableStore):
        return await store.rooms()
    raise TypeError(f"{type(store).__name__} cannot list its rooms")
