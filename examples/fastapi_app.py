"""A FastAPI app with its own login that mounts chatcore at /chat.

    uvicorn examples.fastapi_app:app        # then open http://127.0.0.1:8000/login?name=alice

The app decides who the chat user is (here a cookie set by its own /login);
chatcore serves its page at /chat/ and its WebSocket at /chat/ws.
"""

from contextlib import asynccontextmanager

from fastapi import FastAPI, Response

from chatcore_asgi import ChatApp

chat = ChatApp(identify=lambda scope: _cookie(scope, "user"))


@asynccontextmanager
async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
    async with chat.running():  # mounted apps get no lifespan events: start chatcore here
        yield


app = FastAPI(lifespan=lifespan)
app.mount("/chat", chat)


@app.get("/login")
def login(name: str, response: Response) -> dict[str, str]:
    response.set_cookie("user", name, httponly=True, samesite="strict")
    return {"user": name, "chat": "/chat/"}


def _cookie(scope, name):  # type: ignore[no-untyped-def]
    from http.cookies import SimpleCookie

    raw = dict(scope["headers"]).get(b"cookie", b"").decode("latin-1")
    morsel = SimpleCookie(raw).get(name)
    return morsel.value if morsel is not None else None
