"""Profile a server under a fixed fan-out load, or under churn, with py-spy.

    python -m benchmarks.profile [--server chatcore] [--scenario b] [--rate 100000]
                                 [--seconds 8] [--out /tmp/chatcore-profile.txt]
    python -m benchmarks.profile --scenario storm     # 1,000 clients joining one room
    python -m benchmarks.profile --scenario churn [--server websockets]

Starts the server and its clients exactly as the benchmark does, attaches
``py-spy record`` (raw collapsed stacks) to the server while the generator
offers ``--rate`` deliveries/s (``storm``: while 1,000 clients join one room,
recorded until the room is full; ``churn``: connects and closes new users as
fast as it can, 20 in flight, next to 100 members, as the churn scenario
does), then prints where the time goes: the frames with the most samples on
top of the stack (self) and anywhere in it (total). The raw file can be
turned into a flame graph with any collapsed-stack tool.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from ._counters import Counters, raise_nofile
from ._scenarios import SCENARIOS, Scenario, Session, summarize
from ._servers import PRIORITY, SERVERS, RunningServer
from ._storm import storm
from ._wire import Flavor, close_all, open_many

CHURN = Scenario("churn", "100 members + churn", 100, 1, 1, 1)

# Frames of threads that only wait (the store's worker threads, idle selects).
_IDLE = ("_worker (concurrent/futures/thread.py", "select (selectors.py", "wait (threading.py")


def report(path: Path, top: int = 25) -> str:
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    n = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if frames[-1].startswith(_IDLE):
            continue
        c = int(count)
        n += c
        own[frames[-1]] += c
        for f in set(frames):
            total[f] += c
    if not n:
        return "no samples"
    lines = [f"{n} samples (idle threads left out)", "", "self:"]
    lines += [f"  {c / n:6.1%}  {f}" for f, c in own.most_common(top)]
    lines += ["", "total (frame anywhere on the stack):"]
    lines += [f"  {c / n:6.1%}  {f}" for f, c in total.most_common(top + 12)]
    return "\n".join(lines)


def churn_for(port: int, flavor: Flavor, seconds: float) -> int:
    """Connect+close cycles of new users, 20 in flight, for ``seconds``: how many."""
    cycles = n = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        targets = [flavor.target(f"churn{n + i}", ["room0"]) for i in range(20)]
        n += 20
        with contextlib.suppress(Exception):  # a failed handshake: go on
            cycles += close_all(open_many(port, targets, flavor.subprotocol), flavor.after_open)[0]
    return cycles


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile")
    p.add_argument("--server", default="chatcore", choices=sorted(SERVERS))
    p.add_argument("--scenario", default="b", choices=[*sorted(SCENARIOS), "churn", "storm"])
    p.add_argument("--rate", type=int, default=100_000)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--out", type=Path, default=Path("/tmp/chatcore-profile.txt"))
    args = p.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        print("py-spy not found: pip install 'chatcore[bench]'")
        return 2
    raise_nofile(8192)
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {1})
        if PRIORITY:
            os.setpriority(os.PRIO_PROCESS, 0, PRIORITY)
            os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(1))
    if args.scenario == "storm":
        return profile_storm(py_spy, args.server, args.out)
    counters = Counters(1, nice=PRIORITY + 5 if PRIORITY else 19)
    churn = args.scenario == "churn"
    spec = SERVERS[args.server]
    session = Session(spec, CHURN if churn else SCENARIOS[args.scenario], counters)
    try:
        if not churn:
            session.warm_up(args.rate)
        spy = subprocess.Popen(
            [
                py_spy,
                "record",
                "-p",
                str(session.server.pid),
                "-f",
                "raw",
                "-r",
                "250",
                "-d",
                str(int(args.seconds) + 1),
                "-o",
                str(args.out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if churn:
            cycles = churn_for(session.server.port, spec.flavor, args.seconds)
            summary = f"{cycles / args.seconds:,.0f} connect+close/s"
        else:
            verdict = summarize(session.step(args.rate, args.seconds))
            summary = (
                f"at {args.rate:,}/s: got {verdict['achieved_per_s']:,}/s, p99 "
                f"{verdict['p99_ms']} ms, {verdict['server_us_per_delivery']} us/delivery, "
                f"server CPU {verdict['server_cpu_share']:.0%}"
            )
        spy.wait(timeout=args.seconds + 30)
    finally:
        session.close()
        counters.stop()
    print(f"{args.server} scenario {args.scenario} {summary}")
    print(report(args.out))
    print(f"\nraw stacks: {args.out}")
    return 0


def _record(py_spy: str, pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    argv = [py_spy, "record", "-p", str(pid), "-f", "raw", "-r", "250"]
    argv += ["-d", str(int(seconds) + 1), "-o", str(out)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def profile_storm(py_spy: str, server: str, out: Path) -> int:
    """The join storm under py-spy: one fresh server, recorded while the room fills."""
    spec = SERVERS[server]
    running = RunningServer(spec, core=0)
    try:
        spy = _record(py_spy, running.pid, 20, out)
        result, socks = storm(running.port, spec.flavor)
        spy.send_signal(signal.SIGINT)  # stop recording: the room is full
        spy.wait(timeout=30)
        for sock in socks:
            sock.close()
    finally:
        running.stop()
    print(f"{server} join storm: {result.in_room:,} clients in the room in {result.seconds} s")
    print(report(out))
    print(f"\nraw stacks: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
