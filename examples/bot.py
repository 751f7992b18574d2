"""An echo bot with the Python client: it answers every message in its rooms.

    python examples/bot.py ws://127.0.0.1:8000/ws general

If the connection drops, the client reconnects and resumes by itself: the bot
sees the messages it missed, once each.
"""

import sys

import anyio

from chatcore_server import connect


async def main(url: str, rooms: list[str]) -> None:
    async with connect(url, user="echobot", rooms=rooms) as chat:
        async for event in chat:
            if event["type"] == "message" and event["from"] != "echobot":
                await chat.send(event["room"], f"{event['from']} said: {event['text']}")


if __name__ == "__main__":
    anyio.run(
        main,
        sys.argv[1] if len(sys.argv) > 1 else "ws://127.0.0.1:8000/ws",
        sys.argv[2:] or ["general"],
    )
