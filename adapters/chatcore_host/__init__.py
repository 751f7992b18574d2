"""chatcore_host: run a :class:`chatcore.Engine` behind any server.

:class:`EngineHost` feeds the engine, carries its effects out (connection
effects to a :class:`Transport` the server implements, storage effects to a
:class:`chatcore_store.HistoryStore`), keeps its one timer and runs the store.
The request policy every server needs (tokens, the page's origin, who may
read a room's history) takes plain headers and query values, and so does the
admin API (``check_admin``, ``admin_request``). The HTTP routes every server
serves (``_routes.answer``: method, path, query, headers and body in; status,
headers and body out) live here too, imported on their own since they need
prometheus-client. Needs anyio; no HTTP or WebSocket library.
"""

from typing import TYPE_CHECKING

from ._admin import MAX_ADMIN_BODY, AdminReply, admin_request, check_admin
from ._controls import ChatControls
from ._host import Bus, BusEffect, EngineHost, ScreenHook, Transport
from ._policy import (
    AuthError,
    Headers,
    authenticate,
    bearer_token,
    header,
    header_tokens,
    origin_allowed,
    parse_origin,
    read_history,
    repeated_header,
)
from ._record import RecordFile, read_record
from ._tally import BusTally

if TYPE_CHECKING:
    from ._bus import RedisBus

__all__ = [
    "MAX_ADMIN_BODY",
    "AdminReply",
    "AuthError",
    "Bus",
    "BusEffect",
    "BusTally",
    "ChatControls",
    "EngineHost",
    "Headers",
    "RecordFile",
    "RedisBus",
    "ScreenHook",
    "Transport",
    "admin_request",
    "authenticate",
    "bearer_token",
    "check_admin",
    "header",
    "header_tokens",
    "origin_allowed",
    "parse_origin",
    "read_history",
    "read_record",
    "repeated_header",
]


def __getattr__(name: str) -> object:
    # RedisBus needs redis-py (the ``redis`` extra): imported on first use only.
    if name == "RedisBus":
        from ._bus import RedisBus

        return RedisBus
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
