"""Every rung of a results file, server by server: latency and CPU up to saturation.

    python -m benchmarks.rungs [benchmarks/results/latest.json] [--scenario b] [--timeline]
                               [--noise]

One line per offered rate, one column per server: p50 / p99 ms and the server's
CPU share, the median over the repetitions of the last attempt at that rung
(``*`` marks a rung some repetition failed, ``!`` one that some repetition ran with
more than 3% of a core stolen by the hypervisor). ``--timeline`` also prints each
rung's p50/p99 per second, repetition by repetition; ``--noise`` every repetition's
rung with what else ran: other processes' CPU (share of one core) and the steal.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from ._scenarios import STEAL_MAX


def last_attempts(run: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """The last attempt at each rung of one run (a rung run again replaces the first)."""
    out: dict[int, dict[str, Any]] = {}
    for step in run.get("steps", []):
        out[int(step["offered"])] = step
    return out


def table(result: dict[str, Any], scenario: str) -> str:
    runs = [r for r in result["runs"] if r.get("scenario") == scenario and "steps" in r]
    servers = list(dict.fromkeys(r["server"] for r in runs))
    by_server: dict[str, list[dict[int, dict[str, Any]]]] = {
        s: [last_attempts(r) for r in runs if r["server"] == s] for s in servers
    }
    rates = sorted({rate for reps in by_server.values() for rep in reps for rate in rep})
    lines = [
        "| deliveries/s | " + " | ".join(servers) + " |",
        "|---:|" + "---:|" * len(servers),
    ]
    for rate in rates:
        cells = []
        for server in servers:
            steps = [rep[rate] for rep in by_server[server] if rate in rep]
            if not steps:
                cells.append("-")
                continue
            p50 = statistics.median(s["p50_ms"] for s in steps)
            p99 = statistics.median(s["p99_ms"] for s in steps)
            cpu = statistics.median(s.get("server_cpu_share", 0.0) for s in steps)
            failed = "*" if any(not s.get("passed") for s in steps) else ""
            stolen = max(
                max(s.get("steal_server_core", 0.0), s.get("steal_generator_core", 0.0))
                for s in steps
            )
            noisy = "!" if stolen > STEAL_MAX else ""
            cells.append(f"{p50:.1f} / {p99:.1f} ({cpu:.0%}){failed}{noisy}")
        lines.append(f"| {rate:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def timelines(result: dict[str, Any], scenario: str) -> str:
    lines = []
    for run in result["runs"]:
        if run.get("scenario") != scenario or "steps" not in run:
            continue
        for rate, step in last_attempts(run).items():
            seconds = "  ".join(
                f"{b['p50_ms']:.1f}/{b['p99_ms']:.1f}" for b in step.get("per_second", [])
            )
            lines.append(f"{run['server']:24} rep {run.get('rep', 1)} {rate:>9,}/s  {seconds}")
    return "\n".join(lines)


def noise(result: dict[str, Any], scenario: str) -> str:
    """Each repetition's rungs: p50/p99, server CPU, others' CPU and steal, pass or fail."""
    lines = []
    for run in result["runs"]:
        if run.get("scenario") != scenario or "steps" not in run:
            continue
        for rate, st in last_attempts(run).items():
            lines.append(
                f"{run['server']:24} rep {run.get('rep', 1)} {rate:>9,}/s  "
                f"p50 {st['p50_ms']:7.1f} p99 {st['p99_ms']:7.1f} ms  "
                f"cpu {st.get('server_cpu_share', 0.0):4.0%}  "
                f"others {st.get('others_share', 0.0):4.0%}  "
                f"steal {st.get('steal_server_core', 0.0):.0%}/"
                f"{st.get('steal_generator_core', 0.0):.0%}  "
                f"{'pass' if st.get('passed') else 'FAIL'}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.rungs")
    p.add_argument("results", nargs="?", type=Path, default=Path("benchmarks/results/latest.json"))
    p.add_argument("--scenario", default="b")
    p.add_argument("--timeline", action="store_true", help="p50/p99 per second of every rung")
    p.add_argument("--noise", action="store_true", help="every repetition with others' CPU")
    args = p.parse_args(argv)
    result = json.loads(args.results.read_text())
    print(f"{result['date']}: {result['command']}")
    print(table(result, args.scenario))
    if args.timeline:
        print()
        print(timelines(result, args.scenario))
    if args.noise:
        print()
        print(noise(result, args.scenario))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
