"""``python -m benchmarks``: chatcore against the servers users would otherwise pick.

    python3 dev.py bench                 full run (scenarios a, b, c, slow consumer, churn)
    python3 dev.py bench --short         CI: scenario a, three ladder steps, ~1 minute
    python3 dev.py bench --servers chatcore,websockets --scenarios b --reps 1
    python -m benchmarks --servers chatcore,chatcore-plain,websockets,picows --scenarios storm

The server under test runs on core 0 (``taskset -c 0``), this process (senders
and probes) on core 1 with the byte-counting receivers in a nice-19 child.
Servers run in interleaved order, rotated each repetition; figures are medians.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ._counters import Counters, raise_nofile
from ._proc import machine
from ._scenarios import (
    CPU_RATE,
    GENERATOR_CORE,
    LATENCY_RATE,
    SCENARIOS,
    STEAL_MAX,
    churn_run,
    ladder_run,
    slow_consumer_run,
)
from ._servers import PRIORITY, ROOT, SERVERS, ServerSpec, add_baseline
from ._storm import CLIENTS, IN_FLIGHT, storm_run

FULL_LADDER = [20_000, 50_000, 100_000, 150_000, 200_000, 250_000, 300_000, 400_000, 500_000]
SHORT_LADDER = [20_000, 100_000, 200_000]
PEERS = ["websockets", "picows", "socketio"]


def log(text: str) -> None:
    print(text, flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--short", action="store_true", help="CI mode: scenario a, three steps")
    p.add_argument("--servers", help="comma-separated, from: " + ", ".join(SERVERS))
    p.add_argument(
        "--scenarios",
        help="comma-separated, from: a, b, c, slow, churn, storm "
        f"(storm: {CLIENTS:,} clients join one room, {IN_FLIGHT} in flight; not in the default)",
    )
    p.add_argument("--reps", type=int, help="repetitions (default 2; --short: 1)")
    p.add_argument("--ladder", help="comma-separated offered deliveries/s")
    p.add_argument("--step", type=float, help="seconds per ladder step (default 2; --short 1.5)")
    p.add_argument(
        "--json",
        type=Path,
        help="where to write the results (default "
        "benchmarks/results/latest.json, --short: benchmarks/results/short.json)",
    )
    p.add_argument(
        "--quiet-timeout",
        type=float,
        default=None,
        help="seconds to wait for other processes to go quiet before each run",
    )
    p.add_argument(
        "--no-rt", action="store_true", help="do not run the generator at real-time priority"
    )
    p.add_argument("--max-minutes", type=float, help="hard time budget (default 30; --short: 5)")
    p.add_argument("--no-engine", action="store_true", help="skip the engine-only benchmark")
    p.add_argument(
        "--timeline",
        action="store_true",
        help="print each step's latency over time (p50/p99 per second); always in the JSON",
    )
    p.add_argument(
        "--baseline",
        type=Path,
        help="a chatcore checkout (or `git archive` of one) to run as chatcore-baseline "
        "and chatcore-plain-baseline, next to this one in the same run",
    )
    p.add_argument(
        "--min-ratio",
        type=float,
        default=None,
        help="exit 1 if chatcore's sustained rate is below this times websockets' "
        "(default for --short: 0.5)",
    )
    return p.parse_args(argv)


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _sustained(runs: list[dict[str, Any]], floor: int) -> tuple[float | None, str, float | None]:
    """Median and best sustained rate of one server in one scenario, and a bound mark.

    Each run counts with the highest rung it passed; a run stopped by an invalid rung
    (the machine was too busy to conclude) counts with that lower bound. The mark is
    ">=" when every run passed the top of the ladder, "<" when none passed the first.
    """
    done = [r for r in runs if "sustained" in r]
    if not done:
        return None, "", None
    values = [r["sustained"] for r in done]
    best = max(values)
    if all(r.get("top") for r in done):
        return statistics.median(values), ">=", best
    if best == 0:
        return floor, "<", floor
    return statistics.median(values), "", best


def summarize(runs: list[dict[str, Any]], floor: int) -> dict[str, Any]:
    """Medians per (scenario, server), and chatcore's ratio to each peer."""
    grouped: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for run in runs:
        if run.get("scenario") in SCENARIOS:
            grouped.setdefault(run["scenario"], {}).setdefault(run["server"], []).append(run)
    figures = ("us_per_delivery", "p50_ms_20k", "p99_ms_20k", "rss_per_idle_conn_kib")
    medians: dict[str, dict[str, Any]] = {}
    for sc, by_server in grouped.items():
        medians[sc] = {}
        for server, server_runs in by_server.items():
            value, bound, best = _sustained(server_runs, floor)
            row: dict[str, Any] = {"sustained": value, "bound": bound, "best": best}
            for key in figures:
                row[key] = _median([r[key] for r in server_runs if r.get(key) is not None])
            row["reps"] = len(server_runs)
            medians[sc][server] = row
    ratios: dict[str, dict[str, Any]] = {}
    for sc, rows in medians.items():
        core = rows.get("chatcore")
        if not core:
            continue
        ratios[sc] = {}
        sqlite = rows.get("chatcore-sqlite")
        if sqlite and core["sustained"] and sqlite["sustained"] is not None:
            core["sqlite_share"] = round(sqlite["sustained"] / core["sustained"], 2)
        for peer, m in rows.items():
            if peer.startswith("chatcore"):
                continue
            ratios[sc][peer] = {
                "sustained": _ratio(core["sustained"], m["sustained"]),
                "sustained_bound": _ratio_bound(core["bound"], m["bound"]),
                "sustained_best": _ratio(core["best"], m["best"]),
                "us_per_delivery": _ratio(m["us_per_delivery"], core["us_per_delivery"]),
                "p99_ms_20k": _ratio(m["p99_ms_20k"], core["p99_ms_20k"]),
                "rss_per_idle_conn_kib": _ratio(
                    m["rss_per_idle_conn_kib"], core["rss_per_idle_conn_kib"]
                ),
            }
    return {"medians": medians, "ratios": ratios, "storm": storm_summary(runs)}


def storm_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Join storm, per server: median seconds to a full room (a repetition that did not
    fill the room counts as missing), and each server's time over picows'."""
    by_server: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        if run.get("scenario") == "storm":
            by_server.setdefault(run["server"], []).append(run)
    rows: dict[str, Any] = {}
    for server, server_runs in by_server.items():
        times = [r["seconds"] for r in server_runs if r.get("seconds") is not None]
        views = [r["views_full"] for r in server_runs if r.get("views_full") is not None]
        rows[server] = {
            "seconds": _median(times),
            "all": times,
            "reps": len(server_runs),
            "full": len(times),
            "views_full_min": min(views) if views else None,
            "server_cpu_s": _median(
                [r["server_cpu_s"] for r in server_runs if "server_cpu_s" in r]
            ),
        }
    picows = rows.get("picows", {}).get("seconds")
    for row in rows.values():
        row["over_picows"] = _ratio(row["seconds"], picows)
    return rows


def _ratio_bound(core: str, peer: str) -> str:
    """ ">=" when chatcore's rate is a lower bound (top of the ladder) or the peer's an
    upper bound (it failed the first rung); "?" when chatcore failed the first rung."""
    if core == "<":
        return "?"
    return ">=" if core == ">=" or peer == "<" else ""


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return round(a / b, 2)


def _fmt(v: Any, spec: str = ",.0f", unit: str = "") -> str:
    if v is None:
        return "-"
    return f"{v:{spec}}{unit}"


def table(result: dict[str, Any]) -> str:
    """The terminal (and README) table: one line per server and scenario, medians."""
    lines = []
    m = result["machine"]
    lines.append(
        f"machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, Linux {m['kernel']}"
    )
    lines.append(f"date: {result['date']}   command: {result['command']}")
    medians = result["summary"]["medians"]
    if medians:
        lines.append("")
        lines.append(
            "| scenario | server | sustained deliveries/s (best) | CPU us/delivery at 100k/s "
            "| p50 / p99 ms at 20k/s | RSS KiB per idle conn |"
        )
        lines.append("|---|---|---:|---:|---:|---:|")
    for sc, by_server in medians.items():
        for server, row in by_server.items():
            top = {">=": ">= ", "<": "< ", "?": "? "}.get(row["bound"], "")
            sustained = _fmt(row["sustained"])
            lines.append(
                f"| {SCENARIOS[sc].title} | {server} | {top}{sustained} ({_fmt(row['best'])}) "
                f"| {_fmt(row['us_per_delivery'], '.2f')} "
                f"| {_fmt(row['p50_ms_20k'], '.2f')} / {_fmt(row['p99_ms_20k'], '.2f')} "
                f"| {_fmt(row['rss_per_idle_conn_kib'], '.1f')} |"
            )
    ratios = result["summary"]["ratios"]
    if any(ratios.values()):
        lines.append("")
        lines.append(
            "chatcore's ratio to each peer (same run, medians; > 1 means chatcore is better):"
        )
        for sc, by_peer in ratios.items():
            parts = []
            for peer, r in by_peer.items():
                bound = {">=": ">= ", "?": "? "}.get(r["sustained_bound"], "")
                parts.append(
                    f"{bound}{_fmt(r['sustained'], '.1f')}x {peer}"
                    f" (CPU {_fmt(r['us_per_delivery'], '.1f')}x,"
                    f" p99 {_fmt(r['p99_ms_20k'], '.1f')}x,"
                    f" RSS {_fmt(r['rss_per_idle_conn_kib'], '.1f')}x)"
                )
            share = medians[sc]["chatcore"].get("sqlite_share")
            if share is not None:
                parts.append(f"SQLite store on: {share:.0%} of the in-memory rate")
            lines.append(f"  {SCENARIOS[sc].title}: rate " + "; ".join(parts))
    storm = result["summary"].get("storm")
    if storm:
        lines.append("")
        lines.append(
            f"| server | join storm: s to {CLIENTS:,} in one room, median (each) "
            "| x picows' time | server CPU s | views holding everyone |"
        )
        lines.append("|---|---:|---:|---:|---:|")
        for server, row in storm.items():
            each = ", ".join(f"{t:.2f}" for t in row["all"])
            lost = row["reps"] - row["full"]
            lines.append(
                f"| {server} | {_fmt(row['seconds'], '.2f')} ({each}"
                f"{f'; {lost} not full' if lost else ''}) "
                f"| {_fmt(row['over_picows'], '.2f')} | {_fmt(row['server_cpu_s'], '.2f')} "
                f"| {_fmt(row['views_full_min'], ',d')} |"
            )
    extra = [r for r in result["runs"] if r.get("scenario") in ("slow", "churn")]
    if extra:
        lines.append("")
        lines.append(
            "| server | slow consumers: p99 ms before -> during | server RSS growth MiB "
            "| slow clients closed | churn: connect+close/s |"
        )
        lines.append("|---|---:|---:|---:|---:|")
        merged: dict[str, dict[str, Any]] = {}
        for r in extra:
            merged.setdefault(r["server"], {}).update(
                {k: v for k, v in r.items() if k not in ("server", "scenario", "notes")}
            )
        for server, r in merged.items():
            growth = r.get("rss_growth_kib")
            lines.append(
                f"| {server} | {_fmt(r.get('p99_ms_base'), '.2f')} -> "
                f"{_fmt(r.get('p99_ms_slow'), '.2f')} "
                f"| {_fmt(growth / 1024 if growth is not None else None, '.1f')} "
                f"| {_fmt(r.get('slow_closed_by_server'), 'd')} "
                f"| {_fmt(r.get('cycles_per_s'), ',.0f')} |"
            )
    engine = result.get("engine")
    if engine:
        lines.append("")
        lines.append("engine only (benchmarks/engine.py, no sockets):")
        lines += ["  " + line for line in engine.get("output", "").strip().splitlines()[-12:]]
    return "\n".join(lines)


def run_engine_bench(timeout: float = 180.0) -> dict[str, Any] | None:
    """The engine alone (``benchmarks/engine.py``, the lead's): no sockets in the way."""
    if not (ROOT / "benchmarks" / "engine.py").exists():
        return None
    log("engine only: python -m benchmarks.engine")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "engine.json"
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks.engine", "--json", str(path)],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout}s"}
        out = proc.stdout + (proc.stderr if proc.returncode else "")
        log(out.rstrip())
        result: dict[str, Any] = {"returncode": proc.returncode, "output": out}
        if path.exists():
            with contextlib.suppress(ValueError):
                result["result"] = json.loads(path.read_text())
        return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    short = args.short
    if args.baseline is not None:
        add_baseline(args.baseline)
    servers = (args.servers or "chatcore,websockets,picows,socketio").split(",")
    if not args.servers and not short and "chatcore-sqlite" in SERVERS:
        servers.insert(1, "chatcore-sqlite")
    unknown = [s for s in servers if s not in SERVERS]
    if unknown:
        log(f"unknown servers: {unknown}; known: {list(SERVERS)}")
        return 2
    scenarios = (args.scenarios or ("a" if short else "a,b,c,slow,churn")).split(",")
    bad = [sc for sc in scenarios if sc not in SCENARIOS and sc not in ("slow", "churn", "storm")]
    if bad:
        log(f"unknown scenarios: {bad}; known: a, b, c, slow, churn, storm")
        return 2
    reps = args.reps or (1 if short else 2)
    if args.quiet_timeout is None:
        args.quiet_timeout = 3.0 if short else 4.0
    args.reps_total = reps
    ladder = (
        [int(x) for x in args.ladder.split(",")]
        if args.ladder
        else (SHORT_LADDER if short else FULL_LADDER)
    )
    step_s = args.step or (1.5 if short else 2.0)
    out_path = args.json or ROOT / "benchmarks" / "results" / (
        "short.json" if short else "latest.json"
    )
    raise_nofile(8192)
    # Bounded in time whatever happens: SIGTERM or the budget ends the run through the
    # finally blocks, which stop every server and the counting process.
    budget = args.max_minutes or (5 if short else 30)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGALRM, _exit_on_signal)
    signal.alarm(int(budget * 60))
    if PRIORITY:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, PRIORITY)
    if PRIORITY and not args.no_rt:
        # Senders and probes keep their schedule only if nothing else on the core can delay
        # them: real-time round robin, lowest RT priority (the kernel's RT throttle still
        # leaves others 5%). The counting child goes back to SCHED_OTHER at nice -10+15.
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(1))
    cores = sorted(os.sched_getaffinity(0))
    pin = GENERATOR_CORE in cores and len(cores) >= 2
    if pin:
        os.sched_setaffinity(0, {GENERATOR_CORE})
    command = "python3 dev.py bench" + (
        ""
        if argv is None and len(sys.argv) < 2
        else " " + " ".join(sys.argv[1:] if argv is None else argv)
    )
    result: dict[str, Any] = {
        "machine": machine(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "method": {
            "ladder": ladder,
            "step_seconds": step_s,
            "reps": reps,
            "server_core": 0,
            "generator_core": GENERATOR_CORE if pin else None,
            "pass": "delivered >= 99.9%, p99 <= 50 ms, achieved >= 97% of offered",
            "steal_max": STEAL_MAX,
            "baseline": str(args.baseline) if args.baseline is not None else None,
            "cpu_rate": CPU_RATE,
            "latency_rate": LATENCY_RATE,
        },
        "runs": [],
    }
    log(f"machine: {result['machine']}")
    started = time.monotonic()
    # Below the senders and probes (real-time when allowed, else nice 0 against nice 19),
    # but when allowed at nice -5, so that other users' ordinary work cannot starve them.
    counters = Counters(GENERATOR_CORE if pin else None, nice=PRIORITY + 5 if PRIORITY else 19)
    try:
        if not args.no_engine and not short:
            result["engine"] = run_engine_bench()
        for rep in range(reps):
            order = servers[rep % len(servers) :] + servers[: rep % len(servers)]
            for sc in scenarios:
                for name in order:
                    spec = SERVERS[name]
                    run = _one(spec, sc, rep, args, ladder, step_s, counters)
                    if run is None:
                        continue
                    run["rep"] = rep + 1
                    result["runs"].append(run)
                    if "sustained" in run:
                        log(
                            f"  -> {name} {sc}: sustained {run['sustained']:,}/s, "
                            f"{run.get('us_per_delivery')} us/delivery at 100k "
                            f"({run.get('sys_us_per_delivery')} in the kernel), "
                            f"p99 at 20k {run.get('p99_ms_20k')} ms, "
                            f"{run.get('rss_per_idle_conn_kib')} KiB/conn ({run['stop']}; "
                            f"{run['seconds']} s)"
                        )
    finally:
        counters.stop()
    result["seconds"] = round(time.monotonic() - started, 1)
    result["summary"] = summarize(result["runs"], ladder[0])
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    log("")
    log(table(result))
    log(f"\nresults: {out_path} ({result['seconds']} s)")
    min_ratio = args.min_ratio if args.min_ratio is not None else (0.5 if short else None)
    if min_ratio is not None:
        return _judge(result, min_ratio)
    return 0


def _one(
    spec: ServerSpec,
    sc: str,
    rep: int,
    args: argparse.Namespace,
    ladder: list[int],
    step_s: float,
    counters: Counters,
) -> dict[str, Any] | None:
    """One run of one server in one scenario (None: not run in this repetition)."""
    name = spec.name
    quiet = args.quiet_timeout
    if sc == "c" and name == "chatcore-sqlite" and not args.servers:
        return None  # the store's cost shows in a and b; c would only add minutes
    if sc in SCENARIOS:
        log(f"rep {rep + 1}/{args.reps_total} scenario {sc} ({SCENARIOS[sc].title}): {name}")
        return _guard(
            lambda: ladder_run(
                spec,
                SCENARIOS[sc],
                ladder,
                step_s,
                counters,
                log,
                quiet_timeout=quiet,
                tries=2,
                show_timeline=args.timeline,
            ),
            name,
            sc,
        )
    if sc == "storm":
        log(f"rep {rep + 1}/{args.reps_total} join storm: {name}")
        return _guard(
            lambda: storm_run(spec, log, quiet_timeout=quiet, ours=[counters.pid, os.getpid()]),
            name,
            sc,
        )
    if rep > 0 or name == "chatcore-sqlite":
        return None  # slow consumers and churn: once per server
    if sc == "slow":
        log(f"slow consumers: {name}")
        return _guard(
            lambda: slow_consumer_run(spec, counters, log, seconds=3.0, quiet_timeout=quiet),
            name,
            sc,
        )
    log(f"connection churn: {name}")
    return _guard(
        lambda: churn_run(spec, counters, log, seconds=3.0, quiet_timeout=quiet), name, sc
    )


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(f"stopped by signal {signum} (time budget or SIGTERM)")


def _guard(fn: Any, name: str, sc: str) -> dict[str, Any]:
    try:
        return dict(fn())
    except Exception as exc:  # one broken server must not lose the others' results
        log(f"  !! {name} {sc}: {type(exc).__name__}: {exc}")
        return {
            "server": name,
            "scenario": sc,
            "error": f"{type(exc).__name__}: {exc}",
            "notes": [],
        }


def _judge(result: dict[str, Any], min_ratio: float) -> int:
    """Ratios only: chatcore must not collapse relative to websockets in the same run."""
    verdicts = []
    for sc, by_peer in result["summary"]["ratios"].items():
        r = by_peer.get("websockets")
        if not r:
            continue
        rate = r["sustained"]
        cpu = r["us_per_delivery"]
        if rate is None or rate < min_ratio:
            verdicts.append(f"scenario {sc}: sustained rate {rate}x websockets < {min_ratio}x")
        if cpu is not None and cpu < min_ratio:
            verdicts.append(f"scenario {sc}: CPU per delivery {cpu}x websockets < {min_ratio}x")
    if not result["summary"]["ratios"]:
        verdicts.append("no ratio to websockets could be computed")
    for v in verdicts:
        log(f"COLLAPSE: {v}")
    return 1 if verdicts else 0
