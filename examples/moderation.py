"""A moderated chat server: every message is screened before it is stored.

    python examples/moderation.py            # http://127.0.0.1:8000/

The hook sees each message (room, sender, text) before it is appended and
answers with one of three verdicts:

* ``screen.replace(text)``: a profanity filter stars out listed words;
* ``screen.refuse(reason)``: a message that is all capitals is refused, and
  its sender gets error ``refused`` with the reason (nobody else sees it);
* ``screen.accept()``: everything else, as sent.

It also routes bot commands: ``/roll`` is answered by the server, which
replaces the command with its result. The hook may be ``async`` (to ask a
moderation service); verdicts are applied in the order messages came.
"""

import random
import re
import signal

import anyio

from chatcore import Screen, Screened
from chatcore_server import ChatServer

BANNED = ("darn", "heck", "frick")
_WORDS = re.compile(r"\b(" + "|".join(BANNED) + r")\b", re.IGNORECASE)


def moderate(screen: Screen) -> Screened:
    text = screen.text
    if text.startswith("/roll"):
        return screen.replace(f"{screen.sender} rolls a die: {random.randint(1, 6)}")
    if text.startswith("/"):
        return screen.refuse(f"unknown command {text.split()[0]!r}; try /roll")
    letters = [c for c in text if c.isalpha()]
    if len(letters) >= 8 and all(c.isupper() for c in letters):
        return screen.refuse("please do not shout")
    cleaned = _WORDS.sub(lambda m: "*" * len(m.group()), text)
    return screen.accept() if cleaned == text else screen.replace(cleaned)


async def main() -> None:
    server = ChatServer(port=8000, screen=moderate)
    async with anyio.create_task_group() as tg:
        url = await tg.start(server.serve)
        print(f"moderated chat at {url}")
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                server.shutdown()
                break


if __name__ == "__main__":
    anyio.run(main)
