"""A :class:`ChatApp` configured from the environment, for ``uvicorn``/``hypercorn`` command lines.

ASGI servers import an application object; they pass it no options. These
variables stand in for ``chatcore serve``'s flags:

========================  ===================================================
``CHATCORE_DB``           history store URL (``--db``; default: memory)
``CHATCORE_GRACE``        seconds of the resume grace period (``--grace``)
``CHATCORE_JWT_SECRET``   require an HS256 token (``--jwt-secret``)
``CHATCORE_ALLOW_ORIGIN`` comma-separated extra browser origins (``--allow-origin``)
``CHATCORE_ADMIN_TOKEN``  bearer token of the admin API (``--admin-token``)
``CHATCORE_LOG_LEVEL``    ``chatcore*`` loggers' threshold (``--log-level``; default: the server's)
========================  ===================================================
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from chatcore import Config
from chatcore_store import open_store

from ._app import ChatApp

__all__ = ["app_from_env"]


def app_from_env(environ: Mapping[str, str] | None = None) -> ChatApp:
    """A ChatApp from ``CHATCORE_*`` variables (``os.environ`` by default)."""
    env = os.environ if environ is None else environ
    if level := env.get("CHATCORE_LOG_LEVEL"):
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        for name in ("chatcore_asgi", "chatcore_host"):
            logging.getLogger(name).setLevel(level.upper())
    config = Config()
    if grace := env.get("CHATCORE_GRACE"):
        config = Config(grace_period=float(grace))
    origins = [o.strip() for o in env.get("CHATCORE_ALLOW_ORIGIN", "").split(",") if o.strip()]
    return ChatApp(
        config=config,
        store=open_store(env.get("CHATCORE_DB", "memory")),
        jwt_secret=env.get("CHATCORE_JWT_SECRET") or None,
        allow_origins=origins,
        admin_token=env.get("CHATCORE_ADMIN_TOKEN") or None,
    )
