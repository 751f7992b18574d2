"""The ASGI path's figures from a benchmark run: ChatApp against python-socketio under uvicorn.

    python -m benchmarks --servers chatcore,chatcore-uvicorn,chatcore-hypercorn,socketio-uvicorn \\
        --scenarios a,b --ladder 2000,5000,10000,20000,35000,50000,75000,100000,... \\
        --json benchmarks/results/asgi.json
    python -m benchmarks.asgi_report benchmarks/results/asgi.json [--cpu-rate 5000]

The run's own table compares every server to ``chatcore``; this one compares
``chatcore-uvicorn`` and ``chatcore-hypercorn`` to ``socketio-uvicorn`` (the
same ASGI server) and the own server to ``chatcore-uvicorn``. CPU per delivery
is taken at ``--cpu-rate``, a rung every server passes (the run's fixed
100,000/s is beyond python-socketio's reach at 100 clients, and a saturated
server's figure is not comparable with an idle one's: it batches more).
Sustained rates are medians over repetitions (best in brackets); "others" is
the CPU other processes used during the rungs, in cores, the noise to read
them with.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

ASGI = ("chatcore-uvicorn", "chatcore-hypercorn")
PEER = "socketio-uvicorn"
OWN = "chatcore"


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def figures(runs: list[dict[str, Any]], cpu_rate: int) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (scenario, server): sustained (median, best), us/delivery at cpu_rate, noise."""
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        if "sustained" in run:
            grouped.setdefault((run["scenario"], run["server"]), []).append(run)
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for key, group in grouped.items():
        rates = [r["sustained"] for r in group]
        at_rate = [
            s
            for r in group
            for s in r["steps"]
            if s.get("offered") == cpu_rate and s.get("server_us_per_delivery") is not None
        ]
        steps = [s for r in group for s in r["steps"] if "others_share" in s]
        out[key] = {
            "reps": len(group),
            "sustained": _median(rates),
            "best": max(rates),
            "stops": [r.get("stop", "") for r in group],
            "us": _median([s["server_us_per_delivery"] for s in at_rate]),
            "us_passed": all(s.get("passed") for s in at_rate) if at_rate else None,
            "others": _median([s["others_share"] for s in steps]),
            "others_max": max((s["others_share"] for s in steps), default=None),
            "steal_max": max(
                (
                    max(s.get("steal_server_core", 0), s.get("steal_generator_core", 0))
                    for s in steps
                ),
                default=None,
            ),
            "invalid": sum(1 for s in steps if not s.get("valid", True)),
        }
    return out


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def report(result: dict[str, Any], cpu_rate: int) -> str:
    f = figures(result["runs"], cpu_rate)
    lines = [
        f"date: {result.get('date')}   command: {result.get('command')}",
        "",
        f"| scenario | server | sustained deliveries/s, median (best) | CPU us/delivery at "
        f"{cpu_rate:,}/s | others' CPU, cores: median (max) | steal max | invalid rungs |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for (sc, server), row in sorted(f.items()):
        us = "-" if row["us"] is None else f"{row['us']:.1f}"
        if row["us_passed"] is False:
            us += " (failed)"
        others = "-" if row["others"] is None else f"{row['others']:.2f} ({row['others_max']:.2f})"
        lines.append(
            f"| {sc} | {server} | {row['sustained']:,.0f} ({row['best']:,.0f}) | {us} "
            f"| {others} | {row['steal_max']:.0%} | {row['invalid']} |"
        )
    lines.append("")
    for sc in sorted({sc for sc, _ in f}):
        peer = f.get((sc, PEER))
        parts = []
        for name in ASGI:
            mine = f.get((sc, name))
            if mine and peer:
                parts.append(
                    f"{name} / {PEER}: sustained {_ratio(mine['sustained'], peer['sustained'])}"
                    f" (best {_ratio(mine['best'], peer['best'])}),"
                    f" CPU per delivery {_ratio(peer['us'], mine['us'])} less"
                )
        own, asgi = f.get((sc, OWN)), f.get((sc, ASGI[0]))
        if own and asgi:
            parts.append(
                f"ASGI path's cost: {ASGI[0]} uses {_ratio(asgi['us'], own['us'])} the own "
                f"server's CPU per delivery; sustains {_ratio(asgi['sustained'], own['sustained'])}"
                " of its rate"
            )
        lines.append(f"scenario {sc}:")
        lines += [f"  {p}" for p in parts]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.asgi_report")
    p.add_argument("json", type=Path, help="a python -m benchmarks --json file")
    p.add_argument("--cpu-rate", type=int, default=5000, help="rung of the CPU column")
    args = p.parse_args()
    print(report(json.loads(args.json.read_text()), args.cpu_rate))


if __name__ == "__main__":
    main()
