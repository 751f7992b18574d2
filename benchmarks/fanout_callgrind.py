"""The whole server's instructions per delivery, under callgrind (noise-free).

    .venv/bin/python benchmarks/fanout_callgrind.py [--members 100] [--messages 300]
                                                    [--burst 1] [--code DIR]

Wall-clock CPU per delivery on a shared 2-core machine moves by 2-3 us between
runs, more than most changes to the server's own code. This counts the
server's user-space instructions instead (the kernel's part, the write system
calls, is not in them): the benchmark's server without clock-paced work
(``churn_memory``'s) runs under ``valgrind --tool=callgrind`` with
instrumentation off, ``--members`` clients join ``room0``, four of them send
20 warm-up messages, then instrumentation is switched on for ``--messages``
messages sent by those four in turn, ``--burst`` at a time: with 1, each
message reaches every member while its writer is idle (one write per
delivery, as at 100,000/s in scenario a); with more, a flush carries several
(as when saturated). Instructions per message and per delivery are the total
divided by the messages and by the frames the members counted. ``--code``
measures another checkout (a ``git archive`` of ``src`` and ``adapters``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._wire import FrameCounter, client_frame
from benchmarks.churn_memory import (
    ROOT,
    callgrind_out,
    connect_members,
    counting,
    drain,
    instructions,
    start_server,
    stop,
)

SENDERS = 4


def send_and_wait(members: list[FrameCounter], first: int, count: int, expect: int) -> None:
    """Send ``count`` messages (senders in turn), then read until ``expect`` frames came."""
    for i in range(first, first + count):
        text = json.dumps({"type": "send", "room": "room0", "text": f"m{i:06d} " + "x" * 80})
        members[i % SENDERS].sock.sendall(client_frame(text.encode()))
    deadline = time.monotonic() + 60
    while sum(m.frames for m in members) < expect:
        if time.monotonic() > deadline:
            raise SystemExit("timed out waiting for the fan-out")
        time.sleep(0.002)
        drain(members)


def main() -> None:
    parser = argparse.ArgumentParser(prog="benchmarks/fanout_callgrind.py")
    parser.add_argument("--members", type=int, default=100)
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--burst", type=int, default=1)
    parser.add_argument("--code", type=Path, default=ROOT)
    args = parser.parse_args()
    out, prefix = callgrind_out("fanout")
    proc, port = start_server("memory", prefix, None, args.code)
    try:
        members = connect_members(port, args.members)
        # Each message: an ack to its sender, the message to every other member.
        per = args.members
        base = sum(m.frames for m in members)
        send_and_wait(members, 0, 20, base + 20 * per)
        time.sleep(1.0)  # (under valgrind: let the joins' late frames come in first)
        drain(members)
        base = sum(m.frames for m in members)
        counting(proc.pid, True)
        sent = 0
        while sent < args.messages:
            n = min(args.burst, args.messages - sent)
            send_and_wait(members, 20 + sent, n, base + (sent + n) * per)
            sent += n
        counting(proc.pid, False)
        frames = sum(m.frames for m in members) - base
    finally:
        stop(proc)
    total = instructions(out)
    deliveries = frames - args.messages  # (the acks are frames too, not deliveries)
    print(
        f"{args.members} members, {args.messages} messages in bursts of {args.burst}: "
        f"{total:,} instructions, {total // args.messages:,} per message, "
        f"{total // max(deliveries, 1):,} per delivery ({deliveries:,} deliveries)"
    )


if __name__ == "__main__":
    main()
