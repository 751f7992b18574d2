"""One server, one scenario: set up the clients, climb the ladder, judge each step.

A step *passes* when at least 99.9% of the deliveries arrived, the probes' p99
latency is at most 50 ms and the deliveries received during the sending window
reach 97% of the offered rate. A step is *valid* only if the measurement itself
was sound: the generator kept its schedule (send lag p99 under 5 ms, its main
process under 90% of its core, the counting process not saturated) and other
processes on the machine stayed under 15% of a core. Invalid steps are run
again (twice at most) and, if still invalid, recorded as such and the ladder stops.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._counters import Counters
from ._load import TEXT_BYTES, Load, Step, pct, timeline
from ._proc import CpuWatch, proc_cpu, rss_kib, wait_quiet
from ._servers import RunningServer, ServerSpec
from ._wire import SOCKETIO, close_all, open_many

DELIVERED_MIN = 0.999
P99_MAX_MS = 50.0
ACHIEVED_MIN = 0.97
OTHERS_MAX = 0.15
LAG_MAX_MS = 5.0
STALE_MAX_MS = 250.0
STEAL_MAX = 0.03  # share of a core the hypervisor may steal before a step is not trusted
SERVER_CORE = 0
GENERATOR_CORE = 1
CPU_RATE = 100_000
LATENCY_RATE = 20_000
SLOW_TEXT_BYTES = 4000
SLOW_STEPS = 4


@dataclass(frozen=True, slots=True)
class Scenario:
    key: str
    title: str
    clients: int
    rooms: int
    senders_per_room: int
    probes_per_room: int


SCENARIOS = {
    "a": Scenario("a", "100 clients, 1 room", 100, 1, 4, 2),
    "b": Scenario("b", "1,000 clients, 1 room", 1000, 1, 4, 12),
    "c": Scenario("c", "1,000 clients, 10 rooms", 1000, 10, 2, 1),
}

Log = Callable[[str], None]


def _settle(pid: int, *, share: float = 0.05, timeout: float = 90.0) -> None:
    """Wait until the server's CPU use falls under ``share`` (setup work done)."""
    deadline = time.monotonic() + timeout
    time.sleep(0.2)
    while time.monotonic() < deadline:
        c0 = proc_cpu(pid)
        time.sleep(0.3)
        if (proc_cpu(pid) - c0) / 0.3 < share:
            return


class Session:
    """A running server with its clients connected."""

    def __init__(
        self,
        spec: ServerSpec,
        sc: Scenario,
        counters: Counters,
        *,
        slow: int = 0,
    ) -> None:
        self.spec = spec
        self.sc = sc
        self.counters = counters
        self.notes: list[str] = []
        self.server = RunningServer(spec, core=SERVER_CORE)
        flavor = spec.flavor
        self.load = Load(self.server.port, flavor)
        per_room = sc.clients // sc.rooms
        plan: list[tuple[str, str, bool]] = []
        slow_targets: list[str] = []
        targets: list[str] = []
        for r in range(sc.rooms):
            room = f"room{r}"
            self.load.members[room] = per_room
            plan += [(f"s{r}x{i}", room, True) for i in range(sc.senders_per_room)]
            plan += [(f"p{r}x{i}", room, False) for i in range(sc.probes_per_room)]
            n = per_room - sc.senders_per_room - sc.probes_per_room
            targets += [flavor.target(f"c{r}x{i}", [room]) for i in range(n)]
        # The slow consumers come first in the counting process (it pauses the first k).
        slow_targets, targets = targets[:slow], targets[slow:]
        self.n_counters = len(slow_targets) + len(targets)
        try:
            self._connect(plan, slow_targets, targets)
        except BaseException:
            self.close()
            raise

    def _connect(
        self, plan: list[tuple[str, str, bool]], slow_targets: list[str], targets: list[str]
    ) -> None:
        counters = self.counters
        flavor = self.spec.flavor
        self.load.connect(plan)
        _settle(self.server.pid)
        rss0 = rss_kib(self.server.pid)
        sio = flavor.kind == SOCKETIO
        if slow_targets:
            counters.connect(
                self.server.port, slow_targets, flavor.subprotocol, sio, flavor.after_open, 4096
            )
        counters.connect(self.server.port, targets, flavor.subprotocol, sio, flavor.after_open)
        _settle(self.server.pid)
        time.sleep(0.3)
        rss1 = rss_kib(self.server.pid)
        self.rss_per_conn_kib = (rss1 - rss0) / max(1, self.n_counters)
        self.rss_idle_kib = rss1

    def pids(self) -> dict[str, int]:
        return {
            "server": self.server.pid,
            "generator": os.getpid(),
            "counters": self.counters.pid,
        }

    def step(self, offered: float, seconds: float, text_bytes: int = TEXT_BYTES) -> Step:
        watch: list[CpuWatch] = []
        result: dict[str, float] = {}

        def marks(edge: str) -> None:
            if edge == "start":
                watch.append(CpuWatch(self.pids()))
            else:
                result.update(watch[0].stop())

        st = self.load.step(offered, seconds, self.counters, marks, text_bytes=text_bytes)
        st.cpu = result
        return st

    def warm_up(self, offered: float) -> bool:
        """Check every client gets messages (all joined) before measuring."""
        for _ in range(4):
            st = self.step(min(offered, 10_000), 0.5)
            if st.expected and st.delivered >= st.expected:
                return True
            time.sleep(0.5)
        self.notes.append(f"warm-up: {st.delivered}/{st.expected} deliveries arrived")
        return False

    def close(self) -> None:
        try:
            self.counters.call("close_all", timeout=30)
        finally:
            self.load.close()
            if not self.server.alive():
                self.notes.append(f"server died: {self.server.log_tail(5)}")
            self.server.stop()


def summarize(st: Step) -> dict[str, Any]:
    cpu = st.cpu
    wall = cpu.get("wall", st.seconds) or st.seconds
    delivered_frac = st.delivered / st.expected if st.expected else 0.0
    achieved = st.achieved_frac
    counted = st.delivered_in_window / (st.offered * st.seconds) if st.offered else 0.0
    p50 = pct(st.latencies_ns, 0.50) / 1e6
    p99 = pct(st.latencies_ns, 0.99) / 1e6
    others = cpu.get("others", 0.0) / wall
    gen = cpu.get("generator", 0.0) / wall
    steal_server = cpu.get(f"steal{SERVER_CORE}", 0.0) / wall
    steal_generator = cpu.get(f"steal{GENERATOR_CORE}", 0.0) / wall
    problems = []
    if max(steal_server, steal_generator) > STEAL_MAX:
        problems.append(
            f"hypervisor stole {steal_server:.0%} of the server's core, "
            f"{steal_generator:.0%} of the generator's"
        )
    if others > OTHERS_MAX:
        problems.append(f"other processes used {others:.0%} of a core")
    if gen > 0.9:
        problems.append(f"generator at {gen:.0%} of its core")
    if st.counter_busy > 0.9:
        problems.append(f"counting process busy {st.counter_busy:.0%}")
    if st.counter_stale_ms > STALE_MAX_MS:
        problems.append(f"counting process starved for {st.counter_stale_ms:.0f} ms")
    if st.lag_p99_ms > LAG_MAX_MS:
        problems.append(f"generator send lag p99 {st.lag_p99_ms:.1f} ms")
    passed = (
        delivered_frac >= DELIVERED_MIN
        and p99 <= P99_MAX_MS
        and achieved >= ACHIEVED_MIN
        and not st.errors
        and not st.closed
    )
    # Deliveries made inside the window, as the probes saw the share of them.
    deliveries = round(min(1.0, achieved) * st.expected)
    server_cpu = cpu.get("server", 0.0)
    return {
        "offered": st.offered,
        "seconds": st.seconds,
        "sent": st.sent,
        "expected": st.expected,
        "delivered": st.delivered,
        "delivered_frac": round(delivered_frac, 5),
        "achieved_per_s": round(deliveries / st.seconds),
        "achieved_frac": round(achieved, 4),
        "achieved_frac_all": round(counted, 4),
        "p50_ms": round(p50, 3),
        "p99_ms": round(p99, 3),
        "samples": len(st.latencies_ns),
        "server_cpu_share": round(server_cpu / wall, 3),
        "server_us_per_delivery": round(server_cpu / deliveries * 1e6, 3) if deliveries else None,
        # Of it, in the kernel (mostly the writes: the same cost whichever server makes them).
        "server_sys_us_per_delivery": (
            round(cpu.get("server_sys", 0.0) / deliveries * 1e6, 3) if deliveries else None
        ),
        "generator_share": round(gen, 3),
        "counter_busy": round(st.counter_busy, 3),
        "others_share": round(others, 3),
        "steal_server_core": round(steal_server, 3),
        "steal_generator_core": round(steal_generator, 3),
        "lag_p99_ms": round(st.lag_p99_ms, 3),
        "counter_stale_ms": round(st.counter_stale_ms, 1),
        "lag_max_ms": round(st.lag_max_ms, 3),
        "backpressure_s": round(st.backpressure_s, 3),
        "errors": st.errors,
        "error_samples": st.error_samples,
        "closed": st.closed,
        "passed": passed,
        "valid": not problems,
        "problems": problems,
        "per_second": timeline(st),
    }


def ladder_run(
    spec: ServerSpec,
    sc: Scenario,
    ladder: list[int],
    step_s: float,
    counters: Counters,
    log: Log,
    *,
    quiet_timeout: float,
    tries: int = 3,
    show_timeline: bool = False,
) -> dict[str, Any]:
    """Climb the ladder of offered delivery rates; the figures of one run."""
    out: dict[str, Any] = {"server": spec.name, "scenario": sc.key, "steps": [], "notes": []}
    quiet, share = wait_quiet([counters.pid, os.getpid()], timeout=quiet_timeout)
    if not quiet:
        out["notes"].append(f"machine not quiet at start: others used {share:.0%} of a core")
    t_start = time.monotonic()
    session = Session(spec, sc, counters)
    try:
        out["rss_per_idle_conn_kib"] = round(session.rss_per_conn_kib, 2)
        out["rss_idle_kib"] = session.rss_idle_kib
        session.warm_up(ladder[0])
        sustained = 0
        done_cpu = False
        stop_reason = "top of the ladder"
        for rate in ladder:
            seconds = max(step_s, 3.0) if rate == CPU_RATE else step_s
            verdict = _measure(session, rate, seconds, log, tries=tries, show=show_timeline)
            out["steps"].append(verdict)
            done_cpu = done_cpu or rate == CPU_RATE
            if verdict["passed"]:
                sustained = rate
                continue
            stop_reason = f"failed at {rate:,}/s" if verdict["valid"] else f"invalid at {rate:,}/s"
            break
        if not done_cpu and session.server.alive():
            time.sleep(1.0)
            out["steps"].append(_measure(session, CPU_RATE, max(step_s, 3.0), log, tries=1))
        out["sustained"] = sustained
        out["stop"] = stop_reason
        out["top"] = sustained == ladder[-1]
        cpu_steps = [s for s in out["steps"] if s["offered"] == CPU_RATE]
        if cpu_steps:
            s = cpu_steps[-1]
            out["us_per_delivery"] = s["server_us_per_delivery"]
            out["sys_us_per_delivery"] = s["server_sys_us_per_delivery"]
            out["us_per_delivery_sustained"] = s["passed"]
        lat_steps = [s for s in out["steps"] if s["offered"] == LATENCY_RATE]
        if lat_steps:
            out["p50_ms_20k"] = lat_steps[0]["p50_ms"]
            out["p99_ms_20k"] = lat_steps[0]["p99_ms"]
    finally:
        session.close()
        out["notes"] += session.notes
    out["seconds"] = round(time.monotonic() - t_start, 1)
    return out


def _measure(
    session: Session, rate: int, seconds: float, log: Log, tries: int = 3, show: bool = False
) -> dict[str, Any]:
    """One ladder step, run again if the measurement was unsound or it just failed once."""
    verdict: dict[str, Any] = {}
    failed_once = False
    for attempt in range(tries):
        if not session.server.alive():
            verdict = verdict or {"offered": rate, "valid": True, "passed": False}
            verdict["problems"] = ["server process died"]
            return verdict
        verdict = summarize(session.step(rate, seconds))
        verdict["attempt"] = attempt + 1
        log(
            f"    {session.spec.name:16} {session.sc.key} {rate:>8,}/s "
            f"got {verdict['achieved_per_s']:>8,}/s delivered {verdict['delivered_frac']:.4f} "
            f"p50 {verdict['p50_ms']:6.2f} p99 {verdict['p99_ms']:7.2f} ms "
            f"cpu {verdict['server_cpu_share']:.0%} "
            f"steal {verdict['steal_server_core']:.0%}/{verdict['steal_generator_core']:.0%} "
            f"{'PASS' if verdict['passed'] else 'fail'}"
            f"{' closed ' + str(verdict['closed']) if verdict['closed'] else ''}"
            f"{'' if verdict['valid'] else ' INVALID: ' + '; '.join(verdict['problems'])}"
        )
        if show:
            log(timeline_text(verdict))
        if verdict["passed"]:
            return verdict  # noise only ever hurts a server: a pass under noise stands
        if verdict["valid"]:
            if failed_once:
                return verdict
            failed_once = True
        time.sleep(1.0)  # let queues drain before trying again
    return verdict


def timeline_text(verdict: dict[str, Any]) -> str:
    """A step's latency over time, one line per second: where in the step a tail sits."""
    return "\n".join(
        f"        t+{b['t_s']:4.1f}s  n {b['n']:>6,}  "
        f"p50 {b['p50_ms']:7.2f}  p99 {b['p99_ms']:7.2f} ms"
        for b in verdict.get("per_second", [])
    )


def slow_consumer_run(
    spec: ServerSpec, counters: Counters, log: Log, *, seconds: float, quiet_timeout: float
) -> dict[str, Any]:
    """100 clients in a room, then a tenth of them stop reading.

    The kernel alone takes about 3 MB per stalled loopback socket before the server
    sees any backpressure, so this scenario sends 4 KB texts (100 messages/s, about
    400 KB/s per client) for 12 s, long enough that every stalled client overflows it:
    what happens then is the server's own buffering.
    """
    sc = Scenario("slow", "100 clients, 10 stop reading", 100, 1, 4, 2)
    slow = sc.clients // 10
    rate, text = 100 * (sc.clients - 1), SLOW_TEXT_BYTES
    out: dict[str, Any] = {"server": spec.name, "scenario": "slow", "rate": rate, "notes": []}
    wait_quiet([counters.pid, os.getpid()], timeout=quiet_timeout)
    session = Session(spec, sc, counters, slow=slow)
    try:
        session.warm_up(rate)
        base = summarize(session.step(rate, seconds, text))
        out["p99_ms_base"] = base["p99_ms"]
        counters.call("pause", slow)
        rss: list[int] = [rss_kib(session.server.pid)]
        p99s: list[float] = []
        for _ in range(SLOW_STEPS):
            st = summarize(session.step(rate, seconds, text))
            p99s.append(st["p99_ms"])
            rss.append(rss_kib(session.server.pid))
            if not session.server.alive():
                break
        out["p99_ms_slow"] = max(p99s)
        out["p99_ms_last"] = p99s[-1]
        out["rss_kib"] = rss
        out["rss_growth_kib"] = max(rss) - rss[0]
        time.sleep(4.0)  # a server that closes them may first wait out its close timeout
        closed = int(counters.call("paused_closed"))
        out["slow_closed_by_server"] = closed
        out["p99_ratio"] = round(p99s[-1] / base["p99_ms"], 2) if base["p99_ms"] else None
        log(
            f"    {spec.name:16} slow  p99 {base['p99_ms']:.2f} -> {p99s} ms, "
            f"RSS MiB {[r // 1024 for r in rss]}, slow clients closed: {closed}"
        )
    finally:
        session.close()
        out["notes"] += session.notes
    return out


def churn_run(
    spec: ServerSpec, counters: Counters, log: Log, *, seconds: float, quiet_timeout: float
) -> dict[str, Any]:
    """Connect and disconnect as fast as possible (20 in flight) next to 100 idle members."""
    sc = Scenario("churn", "100 members + churn", 100, 1, 1, 1)
    out: dict[str, Any] = {"server": spec.name, "scenario": "churn", "notes": []}
    wait_quiet([counters.pid, os.getpid()], timeout=quiet_timeout)
    session = Session(spec, sc, counters)
    flavor = spec.flavor
    cycles = 0
    failures = 0
    try:
        watch = CpuWatch(session.pids())
        t_end = time.monotonic() + seconds
        n = 0
        while time.monotonic() < t_end:
            targets = [flavor.target(f"churn{n + i}", ["room0"]) for i in range(20)]
            n += 20
            try:
                opened = open_many(session.server.port, targets, flavor.subprotocol, timeout=5)
            except (OSError, Exception):  # a refused or failed handshake counts, then go on
                failures += 1
                continue
            closed, left = close_all(opened, flavor.after_open)
            cycles += closed
            failures += left
        used = watch.stop()
        out["cycles_per_s"] = round(cycles / used["wall"], 1)
        out["failures"] = failures
        out["server_cpu_share"] = round(used["server"] / used["wall"], 3)
        out["others_share"] = round(used["others"] / used["wall"], 3)
        log(
            f"    {spec.name:16} churn {out['cycles_per_s']:,.0f} connect+close/s "
            f"(server cpu {out['server_cpu_share']:.0%}, failures {failures})"
        )
    finally:
        session.close()
        out["notes"] += session.notes
    return out
