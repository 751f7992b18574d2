"""What a real ``chatcore serve`` keeps per departed user: RSS over distinct-user churn.

    .venv/bin/python benchmarks/churn_memory.py                  # 10,000 cycles, memory store
    .venv/bin/python benchmarks/churn_memory.py --cycles 2000 --db sqlite:///TMP/churn.db

Starts ``python -m chatcore_server serve --port 0``, connects 100 idle members
to ``room0`` (they read everything sent to them), then runs connect+close
cycles of users never seen before (``churn0``, ``churn1``, ...), 20 in flight,
each closing with 1000 as soon as its handshake is done. The server's RSS is
sampled after a warm-up of 1,000 cycles (the start: allocator arenas, caches
and the first ``joined``/``left`` frames warmed), every 1,000 cycles, and after
the members have been idle for a few seconds. The goal (issue 15): the last
sample within 1 MiB of the start. Not a timed test: rates are printed only.

The memory store is the log itself, kept in the server's memory: it keeps one
position row per (user, room) a session ended in (``SavePositions``), as a
database would on disk. ``--db sqlite:///...`` moves those rows to a file.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._proc import rss_kib
from benchmarks._wire import CHATCORE, Flavor, FrameCounter, close_all, open_many

ROOT = Path(__file__).resolve().parent.parent
FLAVOR = Flavor(CHATCORE)
IN_FLIGHT = 20


def start_server(db: str) -> tuple[subprocess.Popen[bytes], int]:
    env = dict(os.environ)
    path = [str(ROOT / "src"), str(ROOT / "adapters")]
    if env.get("PYTHONPATH"):
        path.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "chatcore_server", "serve", "--port", "0", "--db", db,
         "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    # "chatcore is running: open http://127.0.0.1:PORT/ in a browser"
    url = line.split("open ", 1)[1].split()[0]
    return proc, int(url.rstrip("/").rsplit(":", 1)[1])


def drain(readers: list[FrameCounter]) -> None:
    """Read what the members were sent, and answer the server's pings (a run is
    longer than its heartbeat)."""
    for reader in readers:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while data := reader.sock.recv(1 << 20):
                reader.feed(data)
        if reader.reply:
            reader.sock.sendall(reader.reply)
            reader.reply = b""


def cycle_batch(port: int, first: int) -> tuple[int, int]:
    """Connect IN_FLIGHT new users and close each at once; (cycles done, failures)."""
    targets = [FLAVOR.target(f"churn{first + i}", ["room0"]) for i in range(IN_FLIGHT)]
    try:
        opened = open_many(port, targets, FLAVOR.subprotocol, timeout=5)
    except Exception:  # a refused or failed handshake counts, then go on
        return 0, IN_FLIGHT
    return close_all(opened, FLAVOR.after_open)


def main() -> None:
    parser = argparse.ArgumentParser(prog="benchmarks/churn_memory.py")
    parser.add_argument("--cycles", type=int, default=10_000)
    parser.add_argument("--warmup", type=int, default=1_000)
    parser.add_argument("--db", default="memory")
    parser.add_argument("--members", type=int, default=100)
    args = parser.parse_args()
    db = args.db.replace("TMP", tempfile.gettempdir())
    proc, port = start_server(db)
    try:
        members = [
            FrameCounter(s, False)
            for s, _ in open_many(
                port,
                [FLAVOR.target(f"member{i}", ["room0"]) for i in range(args.members)],
                FLAVOR.subprotocol,
            )
        ]
        time.sleep(0.5)
        drain(members)
        n = failures = 0
        while n < args.warmup:
            done, failed = cycle_batch(port, n)
            n += IN_FLIGHT
            failures += failed
            drain(members)
        time.sleep(1.0)
        drain(members)
        start = rss_kib(proc.pid)
        print(f"after {n:,} warm-up cycles: RSS {start / 1024:.1f} MiB", flush=True)
        t0 = time.monotonic()
        cycles = 0
        while cycles < args.cycles:
            done, failed = cycle_batch(port, n)
            n += IN_FLIGHT
            cycles += done
            failures += failed
            drain(members)
            if cycles % 1000 < IN_FLIGHT:
                print(f"  {cycles:6,} cycles  RSS {rss_kib(proc.pid) / 1024:.1f} MiB", flush=True)
        wall = time.monotonic() - t0
        for _ in range(6):  # idle: nothing left to come due should hold departed users
            time.sleep(0.5)
            drain(members)
        end = rss_kib(proc.pid)
        print(
            f"{cycles:,} distinct-user cycles in {wall:.1f} s ({cycles / wall:,.0f}/s), "
            f"{failures} failures; RSS {start / 1024:.1f} -> {end / 1024:.1f} MiB "
            f"({(end - start) / 1024:+.2f} MiB, {(end - start) * 1024 / max(cycles, 1):+.0f} B "
            f"per departed user); goal: within 1 MiB"
        )
        for reader in members:
            reader.sock.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    main()
