"""The store's command-line verbs: ``rooms create``, ``rooms list``, ``history``.

The ``chatcore`` program (chatcore_server) mounts them with
:func:`add_subcommands`; ``python -m chatcore_store`` runs them on their own.
Every verb takes ``--db URL`` (default: the server's, ``sqlite:///chatcore.db``)
and sets ``func(args) -> exit status`` on the parsed arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TextIO

from chatcore import Message, room_rule

from ._base import DurableStore, HistoryStore, StoreUnavailable
from ._open import DEFAULT_URL, create_room, list_rooms, open_store

__all__ = ["LIVE_NOTE", "add_subcommands", "format_message", "main"]

# A running server holds each room in use with the privacy it was loaded with:
# this command writes the database only, and the server reads it again when
# the room is next loaded (after its last member leaves).
LIVE_NOTE = (
    "note: a running server applies this when the room is next loaded, after everyone"
    " in it has left; until then its members and who may join stay as they were"
    " (chatcore rooms create --url URL --token TOKEN changes it through the running"
    " server at once, as ChatServer.create_room does)"
)


LiveCreate = Callable[[argparse.Namespace, list[str]], int]
"""``rooms create`` through a running server: (the parsed arguments, the allow list)
-> exit status. Given by a program that can talk to one (``chatcore``)."""
LiveList = Callable[[argparse.Namespace], int]
"""``rooms list`` through a running server: (the parsed arguments) -> exit status."""


def add_subcommands(
    subparsers: Any,
    *,
    live_options: Callable[[argparse.ArgumentParser], None] | None = None,
    live_create: LiveCreate | None = None,
    live_list: LiveList | None = None,
) -> None:
    """Add ``rooms`` and ``history`` to ``parser.add_subparsers()``'s result.

    With ``live_options`` (adds ``--url`` and ``--token``) and ``live_create``,
    ``rooms create --url URL`` changes the room through that running server
    instead of the database (members no longer allowed leave at once); with
    ``live_list``, ``rooms list --url URL`` lists what that server holds.
    """
    rooms = subparsers.add_parser("rooms", help="create and list rooms")
    verbs = rooms.add_subparsers(dest="rooms_command", metavar="{create,list}", required=True)

    create = verbs.add_parser(
        "create",
        help="create a room, or change who may enter it",
        description="Create a room, or change who may enter it, in the database. A running "
        "server applies the change when the room is next loaded (after everyone in it has "
        "left). With --url and --token (the chatcore program), the running server changes "
        "it at once instead: members no longer allowed are removed and told.",
    )
    create.add_argument("name", help="room name")
    create.add_argument(
        "--private", action="store_true", help="only users on the allow list may join"
    )
    create.add_argument(
        "--allow", default="", metavar="USERS", help="comma-separated user names, e.g. alice,bob"
    )
    _db_option(create)
    if live_options is not None:
        live_options(create)
    create.set_defaults(func=_rooms_create, live_create=live_create)

    listing = verbs.add_parser(
        "list",
        help="list every stored room",
        description="List every room in the database; with --url and --token (the chatcore "
        "program), the rooms a running server knows (stored and in use) instead.",
    )
    _db_option(listing)
    if live_options is not None:
        live_options(listing)
    listing.set_defaults(func=_rooms_list, live_list=live_list)

    history = subparsers.add_parser("history", help="print a room's stored messages")
    history.add_argument("room", help="room name")
    history.add_argument(
        "--utc", action="store_true", help="show times in UTC (default: local time zone)"
    )
    history.add_argument("--limit", type=int, default=None, help="only the newest N messages")
    history.add_argument(
        "--before", type=int, default=None, metavar="OFFSET", help="only offsets below this"
    )
    _db_option(history)
    history.set_defaults(func=_history)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chatcore_store")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    status: int = args.func(args)
    return status


def format_message(message: Message, *, utc: bool = False) -> str:
    """One history line: offset, time (local zone unless ``utc``), sender, text."""
    moment = datetime.datetime.fromtimestamp(message.ts / 1000, tz=datetime.UTC)
    if not utc:
        moment = moment.astimezone()  # the local time zone, as TZ says
    text = message.text.replace("\n", "\n" + " " * 8)
    return f"{message.offset:>6}  {moment:%Y-%m-%d %H:%M:%S %z}  {message.sender}: {text}"


def _db_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db",
        default=DEFAULT_URL,
        metavar="URL",
        help=f"history store: sqlite:///path, postgresql://..., (default {DEFAULT_URL})",
    )


def _run(args: argparse.Namespace, work: Callable[[HistoryStore, TextIO], Awaitable[int]]) -> int:
    async def go() -> int:
        store = open_store(args.db)
        await store.open()
        try:
            return await work(store, sys.stdout)
        finally:
            await store.close()

    try:
        return asyncio.run(go())
    except (StoreUnavailable, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _rooms_create(args: argparse.Namespace) -> int:
    allow = [u.strip() for u in args.allow.split(",") if u.strip()]
    live: LiveCreate | None = getattr(args, "live_create", None)
    if live is not None and getattr(args, "url", None):
        return live(args, allow)

    async def work(store: HistoryStore, out: TextIO) -> int:
        room = await create_room(store, args.name, private=args.private, allow=allow)
        kind = "private" if args.private else "public"
        print(f"room {args.name} ({kind}) saved", file=out)
        if room is not None and room.allow:
            print(f"allowed: {', '.join(sorted(room.allow))}", file=out)
        print(LIVE_NOTE, file=out)
        return 0

    return _run(args, work)


def _rooms_list(args: argparse.Namespace) -> int:
    live: LiveList | None = getattr(args, "live_list", None)
    if live is not None and getattr(args, "url", None):
        return live(args)

    async def work(store: HistoryStore, out: TextIO) -> int:
        rooms = await list_rooms(store)
        print(f"{'ROOM':<24} {'TYPE':<8} {'MESSAGES':>8} {'HEAD':>8}  ALLOW", file=out)
        for r in rooms:
            # What the access rule applies (a DM room is its two users', whatever is stored).
            private, allowed = room_rule(r.name, private=r.private, allow=r.allow)
            kind = "private" if private else "public"
            allow = ",".join(sorted(allowed)) if private else "-"
            print(f"{r.name:<24} {kind:<8} {r.stored:>8} {r.head:>8}  {allow}", file=out)
        return 0

    return _run(args, work)


def _history(args: argparse.Namespace) -> int:
    async def work(store: HistoryStore, out: TextIO) -> int:
        if not isinstance(store, DurableStore):
            print(f"error: {args.db} keeps no history between runs", file=sys.stderr)
            return 1
        if await store.room(args.room) is None:
            print(f"error: no room {args.room} in {args.db}", file=sys.stderr)
            return 1
        messages = await store.history(args.room, before=args.before, limit=args.limit)
        for m in messages:
            print(format_message(m, utc=args.utc), file=out)
        return 0

    return _run(args, work)
