"""chatcore_server: the WebSocket chat server and its Python client.

``ChatServer`` runs a :class:`chatcore.Engine` behind anyio sockets (asyncio or
trio), h11 and wsproto; ``connect`` is the matching client with resume built
in; ``chatcore serve`` (``cli.main``) is the standalone server.
"""

from ._server import ChatServer, Limits
from .client import Chat, ChatClosed, connect

__all__ = ["Chat", "ChatClosed", "ChatServer", "Limits", "connect"]
