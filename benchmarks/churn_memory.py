"""What a real ``chatcore serve`` keeps per departed user: RSS over distinct-user churn.

    .venv/bin/python benchmarks/churn_memory.py                  # 10,000 cycles, memory store
    .venv/bin/python benchmarks/churn_memory.py --cycles 2000 --db sqlite:///TMP/churn.db
    .venv/bin/python benchmarks/churn_memory.py --callgrind 400 [--code DIR | --peer websockets]
    .venv/bin/python benchmarks/churn_memory.py --callgrind-storm [--code DIR | --peer picows]
    .venv/bin/python benchmarks/churn_memory.py --cycles 4000 --paced --pin [--peer websockets]

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

``--callgrind N`` measures the server's whole side of a cycle in instructions
instead (HTTP, handshake, engine, close, the event loop: what wall-clock rates
on a shared machine cannot show): the benchmark's server
(``benchmarks.chatcore_launch``'s config) runs under
``valgrind --tool=callgrind`` with instrumentation off, 100 members connect,
200 warm-up cycles run, then instrumentation is switched on
(``callgrind_control -i on``) for N cycles and the count dumped; instructions
per cycle are the total divided by N. Work paced by the clock is left out, as
under valgrind the server runs ~50x slower and it would be charged to ever
fewer cycles the slower the machine: the server gets no heartbeat and a
crowded room's ``presence`` frame never comes due (at full speed one frame
every 0.5 s covers ~500 cycles). ``--peer websockets`` counts a peer
server's cycle the same way (it sends no welcome, member list or presence;
its own keepalive pings stay on, one per member per 20 s).

``--paced`` runs the benchmark's own server (``benchmarks.chatcore_launch``, every
clock-paced thing on) instead of ``chatcore serve`` or ``_UNPACED``; ``--pin`` puts
the server on core 0 and this client on core 1, as the benchmark does; ``--peer``
runs a peer server; ``--in-flight N`` changes the 20 cycles in flight (1: nothing
for the server's loop to batch). Without ``--callgrind`` the server's CPU time per
cycle (user + system, ``/proc``) is printed with the rate.

``--callgrind-storm`` counts the join storm the same way (``benchmarks._storm``:
1,000 clients into one room, 50 handshakes in flight): instrumentation is on
from the first connect until the room is full and quiet, and the total is
divided by 1,000. With no clock-paced work a crowded room's ``presence``
frames never come due, so the check that every view holds everyone is not
made here (the timed storm makes it).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._proc import proc_cpu, rss_kib
from benchmarks._wire import CHATCORE, Flavor, FrameCounter, close_all, open_many

ROOT = Path(__file__).resolve().parent.parent
FLAVOR = Flavor(CHATCORE)
IN_FLIGHT = 20


# The benchmark's chatcore server with nothing paced by the clock (see --callgrind).
_UNPACED = """
import sys, logging, anyio
from dataclasses import replace
from benchmarks.chatcore_launch import store_for, unlimited_config
from chatcore_server import ChatServer

logging.basicConfig(level=logging.WARNING)
config = replace(unlimited_config(), ping_interval=1e6, presence_interval=1e6)
server = ChatServer(config=config, store=store_for(sys.argv[1]), port=0)

async def main():
    async with anyio.create_task_group() as tg:
        print("open", await tg.start(server.serve), flush=True)

anyio.run(main, backend="asyncio")
"""


def start_server(
    db: str,
    prefix: tuple[str, ...] = (),
    peer: str | None = None,
    code: Path = ROOT,
    *,
    paced: bool = False,
    pin: bool = False,
) -> tuple[subprocess.Popen[bytes], int]:
    """``chatcore serve`` on a free port; with a ``prefix`` (valgrind) the benchmark's
    server without clock-paced work (``paced``: with it, ``benchmarks.chatcore_launch``
    exactly as the benchmark runs it), or the benchmark's ``peer`` server module."""
    env = dict(os.environ)
    path = [str(code / "src"), str(code / "adapters"), str(ROOT)]
    if env.get("PYTHONPATH"):
        path.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(path)
    env["PYTHONHASHSEED"] = "0"
    if peer is not None or paced:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if peer is None:
            args = ["-m", "benchmarks.chatcore_launch", "--port", str(port), "--db", db]
        else:
            args = ["-m", f"benchmarks.peers.{peer}_server", "--port", str(port)]
    elif prefix:
        args = ["-c", _UNPACED, db]
    else:
        args = ["-m", "chatcore_server", "serve", "--port", "0", "--db", db,
                "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(
        [*prefix, sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env
    )
    if pin:  # the server on core 0, this client on core 1, as the benchmark runs them
        os.sched_setaffinity(proc.pid, {0})
        os.sched_setaffinity(0, {1})
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if peer is not None or paced:  # "listening on HOST:PORT", said before it listens
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with socket.socket() as s, contextlib.suppress(OSError):
                s.connect(("127.0.0.1", port))
                break
            time.sleep(0.2)
        return proc, port
    # "chatcore is running: open http://127.0.0.1:PORT/ in a browser", or "open URL"
    url = line.split("open ", 1)[1].split()[0]
    return proc, int(url.rstrip("/").rsplit(":", 1)[1])


def callgrind_out(name: str) -> tuple[Path, tuple[str, ...]]:
    """A fresh dump path and the valgrind prefix that writes there, counting off at start."""
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind not found")
    out = Path(tempfile.mkdtemp(prefix=f"{name}-callgrind-")) / "callgrind.out"
    prefix = ("valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}")
    return out, prefix


def counting(pid: int, on: bool) -> None:
    """Start or stop counting a process's instructions under callgrind (stopping dumps them)."""
    run = ["callgrind_control", "-i", "on" if on else "off", str(pid)]
    subprocess.run(run, check=True, capture_output=True)
    if not on:
        subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)


def instructions(out: Path) -> int:
    """What the dumps beside ``out`` counted (the explicit dump holds it; the exit
    dump is about empty)."""
    total = 0
    for dump in out.parent.glob("callgrind.out*"):
        counts = re.findall(r"^(?:summary|totals): (\d+)", dump.read_text(), re.M)
        total = max([total, *map(int, counts)])
    return total


def stop(proc: subprocess.Popen[bytes], wait: float = 30) -> None:
    """End a server started by ``start_server``, killing it if it does not go in ``wait`` s."""
    proc.terminate()
    try:
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        proc.kill()


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


def cycle_batch(port: int, first: int, in_flight: int = IN_FLIGHT) -> tuple[int, int]:
    """Connect ``in_flight`` new users and close each at once; (cycles done, failures)."""
    targets = [FLAVOR.target(f"churn{first + i}", ["room0"]) for i in range(in_flight)]
    try:
        opened = open_many(port, targets, FLAVOR.subprotocol, timeout=5)
    except Exception:  # a refused or failed handshake counts, then go on
        return 0, in_flight
    return close_all(opened, FLAVOR.after_open)


def connect_members(port: int, n: int) -> list[FrameCounter]:
    targets = [FLAVOR.target(f"member{i}", ["room0"]) for i in range(n)]
    members = [FrameCounter(s, False) for s, _ in open_many(port, targets, FLAVOR.subprotocol)]
    time.sleep(0.5)
    drain(members)
    return members


def run_cycles(
    port: int, members: list[FrameCounter], first: int, n: int, in_flight: int = IN_FLIGHT
) -> tuple[int, int]:
    """``n`` cycles of new users from ``churn{first}`` on; (cycles done, failures)."""
    done = failures = 0
    while done + failures < n:
        ok, failed = cycle_batch(port, first + done + failures, in_flight)
        done += ok
        failures += failed
        drain(members)
    return done, failures


def callgrind(
    db: str,
    n: int,
    members: int,
    peer: str | None,
    code: Path,
    *,
    paced: bool = False,
    in_flight: int = IN_FLIGHT,
) -> None:
    """Instructions the server spends per connect+close cycle (see the docstring)."""
    out, prefix = callgrind_out("churn")
    proc, port = start_server(db, prefix, peer, code, paced=paced)
    try:
        readers = connect_members(port, members)
        run_cycles(port, readers, 0, 200, in_flight)
        time.sleep(1.0)
        drain(readers)
        counting(proc.pid, True)
        t0 = time.monotonic()
        done, failures = run_cycles(port, readers, 200, n, in_flight)
        wall = time.monotonic() - t0
        counting(proc.pid, False)
        for reader in readers:
            reader.sock.close()
    finally:
        stop(proc)
    total = instructions(out)
    print(
        f"{done:,} cycles ({failures} failures, {done / wall:,.1f}/s under valgrind): "
        f"{total:,} instructions, {total / max(done, 1) / 1e6:.2f} M per connect+close cycle "
        f"(dumps in {out.parent})"
    )


def callgrind_storm(db: str, peer: str | None, code: Path) -> None:
    """Instructions the server spends per join of the 1,000-client join storm."""
    from benchmarks._servers import SERVERS
    from benchmarks._storm import CLIENTS, storm

    out, prefix = callgrind_out("storm")
    flavor = SERVERS[peer].flavor if peer is not None else FLAVOR
    proc, port = start_server(db, prefix, peer, code)
    try:
        counting(proc.pid, True)
        result, socks = storm(port, flavor, timeout=900)
        counting(proc.pid, False)
        for sock in socks:
            sock.close()
    finally:
        stop(proc)
    total = instructions(out)
    print(
        f"join storm: {result.in_room:,} of {CLIENTS:,} in the room; {total:,} instructions, "
        f"{total / CLIENTS / 1e6:.2f} M per join (dumps in {out.parent})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="benchmarks/churn_memory.py")
    parser.add_argument("--cycles", type=int, default=10_000)
    parser.add_argument("--warmup", type=int, default=1_000)
    parser.add_argument("--db", default="memory")
    parser.add_argument("--members", type=int, default=100)
    parser.add_argument("--callgrind", type=int, metavar="N", help="instructions per cycle")
    parser.add_argument(
        "--callgrind-storm", action="store_true", help="instructions per join of the join storm"
    )
    parser.add_argument("--peer", help="a peer server instead (websockets, picows)")
    parser.add_argument(
        "--paced",
        action="store_true",
        help="benchmarks.chatcore_launch as the benchmark runs it (with --callgrind: "
        "heartbeat and presence frames on)",
    )
    parser.add_argument(
        "--pin", action="store_true", help="server on core 0, this client on core 1"
    )
    parser.add_argument(
        "--in-flight", type=int, default=IN_FLIGHT, help="with --callgrind: cycles in flight"
    )
    parser.add_argument(
        "--code", type=Path, help="run the src/ and adapters/ of DIR (git archive of a commit)"
    )
    args = parser.parse_args()
    code = ROOT if args.code is None else args.code.resolve()
    db = args.db.replace("TMP", tempfile.gettempdir())
    if args.callgrind:
        callgrind(
            db,
            args.callgrind,
            args.members,
            args.peer,
            code,
            paced=args.paced,
            in_flight=args.in_flight,
        )
        return
    if args.callgrind_storm:
        callgrind_storm(db, args.peer, code)
        return
    proc, port = start_server(db, peer=args.peer, code=code, paced=args.paced, pin=args.pin)
    try:
        members = connect_members(port, args.members)
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
        t0, cpu0 = time.monotonic(), proc_cpu(proc.pid)
        cycles = 0
        while cycles < args.cycles:
            done, failed = cycle_batch(port, n)
            n += IN_FLIGHT
            cycles += done
            failures += failed
            drain(members)
            if cycles % 1000 < IN_FLIGHT:
                print(f"  {cycles:6,} cycles  RSS {rss_kib(proc.pid) / 1024:.1f} MiB", flush=True)
        wall, cpu = time.monotonic() - t0, proc_cpu(proc.pid) - cpu0
        for _ in range(6):  # idle: nothing left to come due should hold departed users
            time.sleep(0.5)
            drain(members)
        end = rss_kib(proc.pid)
        print(
            f"{cycles:,} distinct-user cycles in {wall:.1f} s ({cycles / wall:,.0f}/s, "
            f"server CPU {cpu / max(cycles, 1) * 1e3:.3f} ms a cycle, "
            f"{cpu / wall:.0%} of a core), {failures} failures; "
            f"RSS {start / 1024:.1f} -> {end / 1024:.1f} MiB "
            f"({(end - start) / 1024:+.2f} MiB, {(end - start) * 1024 / max(cycles, 1):+.0f} B "
            f"per departed user); goal: within 1 MiB"
        )
        for reader in members:
            reader.sock.close()
    finally:
        stop(proc, 10)


if __name__ == "__main__":
    main()
