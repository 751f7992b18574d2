"""Senders and probes: the part of the generator that runs at normal priority.

Senders are open-loop: message j is due at ``t0 + j / rate`` whatever happened
to message j-1, and its text carries that due time (``@T<ns>;``, CLOCK_MONOTONIC,
which every process on the machine shares). So a late send counts against
latency instead of hiding it, and the generator's own lag is tracked apart.
Probes parse every frame and turn the stamp into a latency. A sender is a probe
too: it reads the other senders' messages.
"""

from __future__ import annotations

import contextlib
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ._counters import Counters
from ._wire import SIO_PONG, Flavor, FrameReader, client_frame, open_many, send_nowait

TEXT_BYTES = 100


@dataclass(slots=True)
class Probe:
    sock: socket.socket
    room: str
    sends: bool
    reader: FrameReader = field(default_factory=FrameReader)
    out: bytes = b""
    latencies_ns: list[int] = field(default_factory=list)  # this probe's, of the last step


@dataclass(slots=True)
class Step:
    """What one ladder step saw."""

    offered: float  # deliveries per second asked for
    seconds: float
    sent: int = 0
    expected: int = 0
    delivered: int = 0
    delivered_in_window: int = 0
    achieved_frac: float = 0.0  # probe messages received in the window / offered to probes
    latencies_ns: list[int] = field(default_factory=list)
    received_ns: list[int] = field(default_factory=list)  # when each latency was taken
    t0_ns: int = 0  # the sending window's start, for latency over time
    lag_p99_ms: float = 0.0
    lag_max_ms: float = 0.0
    backpressure_s: float = 0.0  # time some sender had bytes the server would not take
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)
    counter_busy: float = 0.0
    closed: int = 0  # receivers whose connection the server closed during the step
    counter_stale_ms: float = 0.0  # longest the counting process went without a pass


def pct(values: list[int], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return float(s[min(len(s) - 1, int(q * len(s)))])


def timeline(st: Step, bucket_s: float = 1.0) -> list[dict[str, float]]:
    """Latency over time within a step: p50 / p99 per ``bucket_s`` of receive time,
    counted from the start of the sending window (the drain after it included)."""
    buckets: dict[int, list[int]] = {}
    width = int(bucket_s * 1e9)
    for at, lat in zip(st.received_ns, st.latencies_ns, strict=True):
        buckets.setdefault((at - st.t0_ns) // width, []).append(lat)
    return [
        {
            "t_s": round(k * bucket_s, 3),
            "n": len(v),
            "p50_ms": round(pct(v, 0.50) / 1e6, 3),
            "p99_ms": round(pct(v, 0.99) / 1e6, 3),
        }
        for k, v in sorted(buckets.items())
    ]


class Load:
    """The probes and senders of one server run, in this process."""

    def __init__(self, port: int, flavor: Flavor) -> None:
        self.port = port
        self.flavor = flavor
        self.probes: list[Probe] = []
        self.ep = select.epoll()
        self.by_fd: dict[int, Probe] = {}
        self.members: dict[str, int] = {}

    def connect(self, plan: list[tuple[str, str, bool]], port: int | None = None) -> None:
        """Open (user, room, sends) probes (on ``port``, another process of a cluster,
        instead of the server's)."""
        targets = [self.flavor.target(user, [room]) for user, room, _ in plan]
        opened = open_many(self.port if port is None else port, targets, self.flavor.subprotocol)
        for (sock, rest), (_, room, sends) in zip(opened, plan, strict=True):
            p = Probe(sock, room, sends)
            if self.flavor.after_open:
                sock.sendall(self.flavor.after_open)
            p.reader.feed(rest)
            self.probes.append(p)
            self.by_fd[sock.fileno()] = p
            self.ep.register(sock.fileno(), select.EPOLLIN)

    def close(self) -> None:
        for p in self.probes:
            with contextlib.suppress(OSError):
                p.sock.close()
        self.probes.clear()
        self.by_fd.clear()
        self.ep.close()

    def step(
        self,
        offered: float,
        seconds: float,
        counters: Counters,
        marks: Callable[[str], None],
        drain_max: float = 2.5,
        text_bytes: int = TEXT_BYTES,
    ) -> Step:
        """Offer ``offered`` deliveries/s for ``seconds``; read until all arrived or drain_max."""
        senders = [p for p in self.probes if p.sends]
        fanout = [self.members[p.room] - 1 for p in senders]
        # How many probes (other than itself) get each sender's message.
        probe_fanout = [
            sum(1 for q in self.probes if q.room == p.room and q is not p) for p in senders
        ]
        per_msg = sum(fanout) / len(fanout)
        msg_rate = offered / per_msg
        total = int(msg_rate * seconds)
        st = Step(offered=offered, seconds=seconds)
        pad = "x" * text_bytes
        flavor = self.flavor
        rooms = [p.room for p in senders]
        lags: list[int] = []
        base_frames = counters.frames()
        base_closed = counters.closed()
        max_stale = 0
        probe_msgs = 0
        probe_window = 0
        c_start = c_end = 0
        t0 = time.monotonic_ns() + 20_000_000
        t_end = t0 + int(seconds * 1e9)
        interval = 1e9 / msg_rate if msg_rate > 0 else float("inf")
        j = 0
        started = ended = False
        blocked_since = 0
        last_progress = time.monotonic_ns()
        last_seen = 0
        latencies = st.latencies_ns
        received = st.received_ns
        st.t0_ns = t0
        for p in self.probes:
            p.latencies_ns.clear()  # each probe's own, of this step only
        nsend = len(senders)
        expected = sum(fanout[i % nsend] for i in range(total))
        busy0 = counters.load()
        while True:
            now = time.monotonic_ns()
            if not started and now >= t0:
                started = True
                c_start = counters.frames()
                busy0 = counters.load()
                marks("start")
            if started and not ended and now >= t_end:
                ended = True
                c_end = counters.frames()
                b1 = counters.load()
                wall = b1[1] - busy0[1]
                st.counter_busy = (b1[0] - busy0[0]) / wall if wall > 0 else 0.0
                marks("end")
            if started and not ended:
                # Before t0 the counting process may idle in its 1 s poll: not a stall.
                stale = now - max(counters.last_pass_ns(), t0)
                max_stale = max(max_stale, stale)
            if started and j < total:
                # Everything due now goes out, one write per sender.
                batch: dict[int, list[bytes]] = {}
                while j < total:
                    due = t0 + int(j * interval)
                    if due > now:
                        break
                    k = j % nsend
                    text = f"@T{due};"
                    text += pad[: text_bytes - len(text)]
                    batch.setdefault(k, []).append(
                        client_frame(flavor.send_payload(rooms[k], text))
                    )
                    lags.append(now - due)
                    j += 1
                for k, frames in batch.items():
                    p = senders[k]
                    data = p.out + b"".join(frames) if p.out else b"".join(frames)
                    had = bool(p.out)
                    p.out = send_nowait(p.sock, data)
                    if p.out and not had:
                        self.ep.modify(p.sock.fileno(), select.EPOLLIN | select.EPOLLOUT)
                st.sent = j
            pending = any(p.out for p in senders)
            if pending and not blocked_since:
                blocked_since = now
            elif not pending and blocked_since:
                st.backpressure_s += (now - blocked_since) / 1e9
                blocked_since = 0
            if ended and j >= total and not pending:
                got = counters.frames() - base_frames + probe_msgs
                if got != last_seen:
                    last_seen = got
                    last_progress = now
                if (
                    got >= expected
                    or now - last_progress > 1_000_000_000
                    or now - t_end > drain_max * 1e9
                ):
                    break
            elif ended and now - t_end > (drain_max + 5) * 1e9:
                break  # a server that never takes the last bytes
            if started and j < total:
                wait = max(0.0, (t0 + int(j * interval) - time.monotonic_ns()) / 1e9)
                timeout = min(wait, 0.005)
            else:
                timeout = 0.002 if not started else 0.02
            for fd, ev in self.ep.poll(timeout):
                p = self.by_fd[fd]
                if ev & select.EPOLLOUT and p.out:
                    p.out = send_nowait(p.sock, p.out)
                    if not p.out:
                        self.ep.modify(fd, select.EPOLLIN)
                if not ev & (select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP):
                    continue
                try:
                    data = p.sock.recv(262144)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    self.ep.unregister(fd)
                    continue
                t_recv = time.monotonic_ns()
                for op, payload in p.reader.feed(data):
                    if op == 1:
                        at = payload.find(b"@T")
                        if at >= 0:
                            sent_ns = int(payload[at + 2 : payload.index(b";", at)])
                            latencies.append(t_recv - sent_ns)
                            p.latencies_ns.append(t_recv - sent_ns)
                            received.append(t_recv)
                            probe_msgs += 1
                            if t0 <= t_recv <= t_end:
                                probe_window += 1
                        elif payload == b"2" and flavor.kind == "socketio":
                            p.out += SIO_PONG
                        elif b'"error"' in payload or payload.startswith(b"error:"):
                            st.errors += 1
                            if len(st.error_samples) < 3:
                                st.error_samples.append(payload[:200].decode(errors="replace"))
                    elif op == 9:
                        p.out += client_frame(payload, opcode=10)
                if p.out and not p.sends:
                    p.out = send_nowait(p.sock, p.out)
        st.closed = counters.closed() - base_closed
        st.counter_stale_ms = max_stale / 1e6
        st.expected = sum(fanout[i % nsend] for i in range(st.sent))
        st.delivered = counters.frames() - base_frames + probe_msgs
        st.delivered_in_window = c_end - c_start + probe_window
        # The achieved rate is judged on the probes: they read at once (real-time
        # priority), while the counting process may count a little late on a busy machine.
        probe_expected = sum(probe_fanout[i % nsend] for i in range(total))
        st.achieved_frac = probe_window / probe_expected if probe_expected else 0.0
        if lags:
            st.lag_p99_ms = pct(lags, 0.99) / 1e6
            st.lag_max_ms = max(lags) / 1e6
        return st
