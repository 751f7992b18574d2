"""chatcore_asgi: chatcore as an ASGI 3 application (uvicorn, hypercorn, Starlette, FastAPI).

:class:`ChatApp` serves the same WebSocket endpoint (``/ws``, both modes),
browser page, ``/healthz``, ``/readyz``, ``/metrics``, ``/rooms``, history and
admin API as ``chatcore serve``, around one :class:`chatcore_host.EngineHost`.
Run it alone (``uvicorn module:app``), or mount it (``app.mount("/chat", chat)``)
and enter ``chat.running()`` in the host app's lifespan. :func:`app_from_env`
builds one from ``CHATCORE_*`` environment variables. Needs anyio,
prometheus-client (and PyJWT for tokens); no web framework, no h11, no wsproto.
"""

from ._app import ChatApp, Identify, Scope
from ._env import app_from_env

__all__ = ["ChatApp", "Identify", "Scope", "app_from_env"]
