"""``chatcore admin ...`` and ``chatcore rooms create/list --url``: the admin API from a shell.

Each verb is one request to a running server's admin API (docs/protocol.md,
"Admin API") with ``Authorization: Bearer TOKEN``; the token comes from
``--token`` or the ``CHATCORE_ADMIN_TOKEN`` environment variable (which keeps
it out of the shell history and the process list). The standard library's
HTTP client, nothing else: the verbs run where only the CLI is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote

__all__ = ["add_admin_subcommands", "live_room_create", "live_room_list", "url_options"]

DEFAULT_SERVER = "http://127.0.0.1:8000/"
TOKEN_ENV = "CHATCORE_ADMIN_TOKEN"


def url_options(parser: argparse.ArgumentParser, *, required: bool) -> None:
    """``--url`` and ``--token``, for a verb that talks to a running server."""
    parser.add_argument(
        "--url",
        default=DEFAULT_SERVER if required else None,
        metavar="URL",
        help="a running server's address, e.g. http://127.0.0.1:8000/"
        + (f" (default {DEFAULT_SERVER})" if required else ": change the room live through it"),
    )
    parser.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV),
        metavar="TOKEN",
        help=f"the server's --admin-token (default: ${TOKEN_ENV})",
    )


def add_admin_subcommands(subparsers: Any) -> None:
    """Add ``admin`` and its verbs to ``parser.add_subparsers()``'s result."""
    admin = subparsers.add_parser(
        "admin",
        help="moderate a running server: list, remove, mute, ban, delete, post",
        description="Talk to a running server's admin API (start it with --admin-token).",
    )
    verbs = admin.add_subparsers(dest="admin_command", required=True, metavar="VERB")

    def verb(name: str, help: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = verbs.add_parser(name, help=help, description=help)
        url_options(parser, required=True)
        return parser

    listing = verb("list", "list rooms (stored and in use), or one room, or the sessions")
    listing.add_argument("what", nargs="?", default="rooms", help="rooms, sessions, or a room")
    listing.set_defaults(func=_list)

    remove = verb("remove", "remove a user from a room, or from the server (close 4003)")
    remove.add_argument("user")
    remove.add_argument("--room", help="only from this room (default: from the server)")
    remove.add_argument("--reason", default="", help="shown to the user")
    remove.set_defaults(func=_remove)

    mute = verb("mute", "a user's messages in a room are refused for a while (0: unmute)")
    mute.add_argument("room")
    mute.add_argument("user")
    mute.add_argument("seconds", type=float)
    mute.add_argument("--reason", default="")
    mute.set_defaults(func=_mute)

    for name, text in (("ban", "refuse a user in a room"), ("unban", "lift a ban")):
        parser = verb(name, text)
        parser.add_argument("room")
        parser.add_argument("user")
        if name == "ban":
            parser.add_argument("--reason", default="")
        parser.set_defaults(func=_ban)

    delete = verb("delete", "show a message as deleted everywhere (its offset stays)")
    delete.add_argument("room")
    delete.add_argument("offset", type=int)
    delete.set_defaults(func=_delete)

    post = verb("post", "post a message into a room as a bot or the system user")
    post.add_argument("room")
    post.add_argument("text")
    post.add_argument("--sender", default="system")
    post.set_defaults(func=_post)


def live_room_create(args: argparse.Namespace, allow: list[str]) -> int:
    """``rooms create NAME --url URL``: create or change the room through the server."""
    body = {"room": args.name, "private": args.private, "allow": allow}
    status = _call(args, "POST", "/admin/rooms", body)
    if status == 0:
        kind = "private" if args.private else "public"
        print(f"room {args.name} ({kind}) saved and applied by the running server")
    return status


def live_room_list(args: argparse.Namespace) -> int:
    """``rooms list --url URL``: the rooms the running server knows, as JSON."""
    return _call(args, "GET", "/admin/rooms")


def _call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> int:
    """Send one request; print the answer (a listing as JSON); the exit status."""
    if not args.token:
        print(f"error: an admin token is needed (--token or ${TOKEN_ENV})", file=sys.stderr)
        return 2
    url = args.url.rstrip("/") + path
    data = None if body is None else json.dumps(body).encode()
    headers = {"authorization": f"Bearer {args.token}", "content-type": "application/json"}
    request = urllib.request.Request(url, data, headers, method=method)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=30) as resp:
            answer = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        print(f"error: {exc.code} {message}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"error: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    if method == "GET":
        print(json.dumps(answer, indent=2, ensure_ascii=False))
    return 0


def _q(name: str) -> str:
    return quote(name, safe="")


def _list(args: argparse.Namespace) -> int:
    if args.what in ("rooms", "sessions"):
        return _call(args, "GET", f"/admin/{args.what}")
    return _call(args, "GET", f"/admin/rooms/{_q(args.what)}")


def _remove(args: argparse.Namespace) -> int:
    if args.room is None:
        return _call(args, "POST", f"/admin/users/{_q(args.user)}/remove", {"reason": args.reason})
    body = {"user": args.user, "reason": args.reason}
    return _call(args, "POST", f"/admin/rooms/{_q(args.room)}/remove", body)


def _mute(args: argparse.Namespace) -> int:
    body = {"user": args.user, "seconds": args.seconds, "reason": args.reason}
    return _call(args, "POST", f"/admin/rooms/{_q(args.room)}/mute", body)


def _ban(args: argparse.Namespace) -> int:
    body = {"user": args.user, "reason": getattr(args, "reason", "")}
    return _call(args, "POST", f"/admin/rooms/{_q(args.room)}/{args.admin_command}", body)


def _delete(args: argparse.Namespace) -> int:
    return _call(args, "DELETE", f"/admin/rooms/{_q(args.room)}/messages/{args.offset}")


def _post(args: argparse.Namespace) -> int:
    body = {"text": args.text, "sender": args.sender}
    return _call(args, "POST", f"/admin/rooms/{_q(args.room)}/messages", body)
