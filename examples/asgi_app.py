"""chatcore as a standalone ASGI app, configured from ``CHATCORE_*`` environment variables.

    CHATCORE_DB=sqlite:///chat.db uvicorn examples.asgi_app:app
    hypercorn examples.asgi_app:app --bind 127.0.0.1:8000

The conformance suite runs this module under both servers (tests/conformance).
"""

from chatcore_asgi import app_from_env

app = app_from_env()
