"""chatcore_server: the WebSocket chat server and its Python client.

``ChatServer`` serves a :class:`chatcore.Engine` over anyio sockets (asyncio
or trio), h11 and wsproto, as the transport of a
:class:`chatcore_host.EngineHost` (which feeds the engine, keeps its timer and
runs the history store); ``connect`` is the matching client with resume built
in; ``chatcore serve`` (``cli.main``) is the standalone server.

Endpoints
---------
``GET /ws?user=NAME&room=ROOM[&room=...][&resume=TOKEN&offset=ROOM:N...]``
    WebSocket. Subprotocol ``chatcore.v1``: JSON frames (docs/protocol.md);
    none: plain text, one line per event. With a JWT secret the user is the
    HS256 token's ``sub`` (``?token=`` or ``Authorization: Bearer``).
``GET /``, ``GET /static/FILE``
    The browser client.
``GET /healthz``
    ``{"status": "ok", "connections": N}`` (503 while shutting down).
``GET /rooms``
    Public rooms held in memory and their member counts.
``GET /rooms/ROOM/messages?before=N&limit=K``
    Stored history, oldest first, at most 100 per page; a private room only
    for a user on its list (the token's user, or ``?user=`` without a secret).

Limits and their answers
------------------------
=====================================================  =============================
request not complete in ``handshake_timeout`` (10 s)   socket closed, no answer
more than ``max_connections`` (10,000) connections      HTTP 503, not upgraded
request line and headers over 16 KiB                    HTTP 431
more than ``max_headers`` (100) header fields           HTTP 431
malformed HTTP                                          HTTP 400
plain request to ``/ws``                                HTTP 426 (``Upgrade: websocket``)
repeated ``Origin`` or ``Sec-WebSocket-*`` header       HTTP 400
``Origin`` not the server's own, nor allowed            HTTP 403
missing or invalid token (with a JWT secret)            HTTP 401
bad ``user``/``room``/``offset`` parameters             HTTP 400 (414: query too long)
message over ``Config.max_frame_bytes``                 close 1009 once its header is read
message over ``max_fragments`` (64) frames              close 1009
invalid UTF-8 in a text frame                           close 1007
binary frame                                            close 1003
a bug while serving one connection                      close 1011 (logged; others go on)
client that does not read (outbox full)                 close 1013 (the engine's bound)
no pong within ``Config.pong_timeout``                  close 4000
SIGINT / SIGTERM                                        close 1001 to all, exit 0
=====================================================  =============================

Errors over HTTP are JSON: ``{"error": {"status": 404, "message": "..."}}``.
"""

from ._server import ChatServer, Limits
from .client import Chat, ChatClosed, ChatRejected, connect

__all__ = ["Chat", "ChatClosed", "ChatRejected", "ChatServer", "Limits", "connect"]
