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
    return sum(proc_cpu_split(pid))


def proc_cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process (all its threads), in seconds; zeros if it is gone.

    The kernel's part (stime) is mostly the socket writes, which cost the same
    whichever server makes them; the user part is the server's own code.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    # After the command name: state is field 3, utime 14 and stime 15 (1-based).
    return int(fields[11]) / TICK, int(fields[12]) / TICK


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
        self.start_split = {name: proc_cpu_split(pid) for name, pid in pids.items()}
        self.start = {name: sum(split) for name, split in self.start_split.items()}

    def stop(self) -> dict[str, float]:
        """Seconds of CPU per watched process (``<name>_sys``: of it, in the kernel),
        ``others``, ``wall``, and ``steal<N>``: seconds the hypervisor stole from
        core N (not counted in ``others``)."""
        wall = time.monotonic() - self.start_t
        busy = busy_seconds() - self.start_busy
        used: dict[str, float] = {}
        for name, pid in self.pids.items():
            user, system = proc_cpu_split(pid)
            user0, system0 = self.start_split[name]
            used[name] = user + system - user0 - system0
            used[f"{name}_sys"] = system - system0
        used["others"] = max(0.0, busy - sum(used[name] for name in self.pids))
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
