"""Fast readers in a process of their own (run by tests/server/test_burst.py).

    python tests/server/burst_readers.py WS_URL ROOM COUNT EXPECTED

Opens COUNT ``websockets`` connections to ROOM, prints ``ready`` once every
one has its welcome, then reads as fast as it can until each has EXPECTED
chat messages or is closed, and prints one JSON line: per reader, the offsets
it got and the close code (None while open). Its own process, so the server's
event loop cannot pace these readers: they read whenever the kernel has bytes.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import websockets.asyncio.client
from websockets.exceptions import ConnectionClosed


async def _open(url: str) -> Any:
    ws = await websockets.asyncio.client.connect(
        url,
        subprotocols=[websockets.Subprotocol("chatcore.v1")],
        max_size=None,
        max_queue=None,  # never stop reading the socket
        compression=None,
        proxy=None,
    )
    first = json.loads(await ws.recv())
    assert first["type"] == "welcome", first
    while json.loads(await ws.recv())["type"] != "members":
        pass
    return ws


async def _read(ws: Any, expected: int) -> dict[str, Any]:
    offsets: list[int] = []
    code: int | None = None
    try:
        while len(offsets) < expected:
            event = json.loads(await ws.recv())
            if event["type"] == "message":
                offsets.append(event["offset"])
    except ConnectionClosed as exc:
        code = exc.rcvd.code if exc.rcvd is not None else 1006
    await ws.close()
    return {"offsets": offsets, "code": code}


async def main(url: str, room: str, count: int, expected: int) -> None:
    conns = [await _open(f"{url}?user=reader{i}&room={room}") for i in range(count)]
    print("ready", flush=True)
    results = await asyncio.wait_for(
        asyncio.gather(*(_read(ws, expected) for ws in conns)), timeout=60
    )
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
