"""The byte-counting receivers: a low-priority child process on the generator's core.

Most clients in a scenario only need to prove that their frames arrived, so
they live here: one epoll loop that wakes at most every ``INTERVAL`` seconds and
reads everything that is ready (so one ``recv`` carries several frames), walks
frame headers, and publishes running totals in shared memory. Being late costs
nothing measured: the frames wait in the kernel, and latency is the probes' job.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import select
import time
from multiprocessing.connection import Connection
from typing import Any

from ._wire import FrameCounter, open_many, send_nowait

INTERVAL = 0.04
# Shared slots: text frames, busy ns, wall ns, connections closed by the server, and the
# monotonic ns of the last pass (a starved counting process shows as a stale stamp).
FRAMES, BUSY_NS, WALL_NS, CLOSED, LAST_NS = range(5)


def _serve(ctl: Connection, totals: Any, core: int | None, nice: int) -> None:
    with contextlib.suppress(OSError):
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))  # never real-time
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    if core is not None:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {core})
    ep = select.epoll()
    ep.register(ctl.fileno(), select.EPOLLIN)
    by_fd: dict[int, FrameCounter] = {}
    paused: set[int] = set()
    start = time.monotonic_ns()
    busy = 0
    size = 1 << 20
    buf = bytearray(size)  # one receive buffer for every socket: no allocation per recv
    while True:
        events = ep.poll(1.0)
        t1 = time.monotonic_ns()
        frames = 0
        for fd, _ in events:
            if fd == ctl.fileno():
                cmd, arg = ctl.recv()
                if cmd == "stop":
                    for c in by_fd.values():
                        c.sock.close()
                    ctl.send(("stopped", None))
                    return
                try:
                    reply = _command(cmd, arg, ep, by_fd, paused)
                except Exception as exc:
                    reply = ("error", f"{type(exc).__name__}: {exc}")
                ctl.send(reply)
                continue
            found = by_fd.get(fd)
            if found is None:
                continue
            c = found
            before = c.frames
            try:
                while True:
                    n = c.sock.recv_into(buf)
                    if not n:
                        raise ConnectionResetError
                    c.feed(buf, n)
                    if n < size:
                        break
            except BlockingIOError:
                pass
            except OSError:
                ep.unregister(fd)
                del by_fd[fd]
                c.sock.close()
                totals[CLOSED] += 1
            if c.reply:
                c.reply = send_nowait(c.sock, c.reply)
            frames += c.frames - before
        t2 = time.monotonic_ns()
        if frames:
            totals[FRAMES] += frames
        busy += t2 - t1
        totals[BUSY_NS] = busy
        totals[WALL_NS] = t2 - start
        totals[LAST_NS] = t2
        rest = INTERVAL - (time.monotonic_ns() - t1) / 1e9
        if rest > 0:
            time.sleep(rest)


def _command(
    cmd: str, arg: Any, ep: select.epoll, by_fd: dict[int, FrameCounter], paused: set[int]
) -> tuple[str, Any]:
    if cmd == "connect":
        port, targets, subprotocol, sio, after_open, rcvbuf = arg
        opened = open_many(port, targets, subprotocol, rcvbuf=rcvbuf)
        for sock, rest in opened:
            c = FrameCounter(sock, sio)
            if after_open:
                sock.sendall(after_open)
            if rest:
                c.feed(rest)
            by_fd[sock.fileno()] = c
            ep.register(sock.fileno(), select.EPOLLIN)
        return ("connected", len(by_fd))
    if cmd == "pause":  # stop reading from `arg` clients: the slow consumers
        for fd in list(by_fd)[: int(arg)]:
            if fd not in paused:
                ep.unregister(fd)
                paused.add(fd)
        return ("paused", len(paused))
    if cmd == "paused_closed":  # how many slow consumers the server has closed
        closed = 0
        for fd in paused:
            sock = by_fd[fd].sock
            try:
                for _ in range(10_000):
                    if not sock.recv(1 << 20):
                        closed += 1
                        break
            except BlockingIOError:
                pass
            except OSError:
                closed += 1
        return ("ok", closed)
    if cmd == "frames_per_client":
        return ("ok", [c.frames for c in by_fd.values()])
    if cmd == "close_all":
        for fd, c in list(by_fd.items()):
            with contextlib.suppress(OSError):
                if fd not in paused:
                    ep.unregister(fd)
                c.sock.close()
        by_fd.clear()
        paused.clear()
        return ("closed", 0)
    return ("error", f"unknown command {cmd}")


class Counters:
    """Handle on the child process (parent side)."""

    def __init__(self, core: int | None, nice: int = 19) -> None:
        ctx = multiprocessing.get_context("fork")
        self.totals = ctx.RawArray("q", 5)
        self._ctl, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, self.totals, core, nice), daemon=True)
        self.proc.start()
        child.close()

    def call(self, cmd: str, arg: Any = None, timeout: float = 120.0) -> Any:
        self._ctl.send((cmd, arg))
        if not self._ctl.poll(timeout):
            raise TimeoutError(f"counter process did not answer {cmd!r} within {timeout}s")
        kind, value = self._ctl.recv()
        if kind == "error":
            raise RuntimeError(f"counter process: {value}")
        return value

    def connect(
        self,
        port: int,
        targets: list[str],
        subprotocol: str | None,
        sio: bool,
        after_open: bytes,
        rcvbuf: int | None = None,
    ) -> int:
        return int(self.call("connect", (port, targets, subprotocol, sio, after_open, rcvbuf)))

    def frames(self) -> int:
        return int(self.totals[FRAMES])

    def last_pass_ns(self) -> int:
        return int(self.totals[LAST_NS])

    def closed(self) -> int:
        return int(self.totals[CLOSED])

    def load(self) -> tuple[int, int]:
        """(busy ns, wall ns) of the loop so far: how close it runs to saturation."""
        return int(self.totals[BUSY_NS]), int(self.totals[WALL_NS])

    def stop(self) -> None:
        with contextlib.suppress(OSError, TimeoutError, EOFError):
            self.call("stop", timeout=10)
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)

    @property
    def pid(self) -> int:
        return int(self.proc.pid or 0)


def raise_nofile(want: int) -> int:
    """Lift the soft RLIMIT_NOFILE towards ``want``; return the new soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


__all__ = ["Counters", "raise_nofile"]
