"""What the harness reads from /proc: CPU time, memory, machine, quietness."""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Iterable

TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0
    # After the command name: state is field 3, utime 14 and stime 15 (1-based).
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def busy_seconds() -> float:
    """CPU seconds all cores have spent not idle since boot."""
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    # user + nice + system only. Interrupt and softirq time is left out on both sides:
    # on loopback most of it is our own traffic, which no process is charged for.
    user, nice, system = (int(p) for p in parts[:3])
    return (user + nice + system) / TICK


def steal_ticks() -> dict[int, int]:
    """Ticks the hypervisor has stolen from each core since boot (``/proc/stat``, steal)."""
    out: dict[int, int] = {}
    try:
        with open("/proc/stat") as f:
            for line in f:
                if not line.startswith("cpu"):
                    break
                name, *parts = line.split()
                if name != "cpu" and len(parts) >= 8:
                    out[int(name[3:])] = int(parts[7])
    except (OSError, ValueError):
        pass
    return out


class CpuWatch:
    """CPU used between two marks: by each watched process, and by everything else."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.start_t = time.monotonic()
        self.start_busy = busy_seconds()
        self.start_steal = steal_ticks()
        self.start = {name: proc_cpu(pid) for name, pid in pids.items()}

    def stop(self) -> dict[str, float]:
        """Seconds of CPU per watched process, ``others``, ``wall``, and ``steal<N>``:
        seconds the hypervisor stole from core N (not counted in ``others``)."""
        wall = time.monotonic() - self.start_t
        busy = busy_seconds() - self.start_busy
        used = {name: proc_cpu(pid) - self.start[name] for name, pid in self.pids.items()}
        used["others"] = max(0.0, busy - sum(used.values()))
        used["wall"] = wall
        for core, ticks in steal_ticks().items():
            used[f"steal{core}"] = (ticks - self.start_steal.get(core, ticks)) / TICK
        return used


def wait_quiet(
    ours: Iterable[int], *, limit: float = 0.10, window: float = 1.0, timeout: float = 30.0
) -> tuple[bool, float]:
    """Wait until processes other than ``ours`` use under ``limit`` of one core.

    Returns (quiet, the last share seen). Bounded by ``timeout``.
    """
    pids = {str(p): p for p in ours}
    deadline = time.monotonic() + timeout
    share = 1.0
    while True:
        watch = CpuWatch(pids)
        time.sleep(window)
        used = watch.stop()
        share = used["others"] / used["wall"]
        if share < limit:
            return True, share
        if time.monotonic() >= deadline:
            return False, share


def machine() -> dict[str, object]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        mem_kib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 1024
    except (ValueError, OSError):
        mem_kib = 0
    return {
        "cpu": model or platform.processor(),
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
    }
