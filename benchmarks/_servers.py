"""The servers under test: how to start each one on core 0, and how to talk to it."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ._wire import CHATCORE, CHATCORE_PLAIN, PLAIN, SOCKETIO, Flavor

ROOT = Path(__file__).resolve().parent.parent
# Where allowed (root or CAP_SYS_NICE), the server and the generator run at nice -10,
# so that other work on a shared machine steals less; "others" CPU is still recorded.
PRIORITY = -10 if os.geteuid() == 0 else 0


@dataclass(frozen=True, slots=True)
class ServerSpec:
    name: str
    flavor: Flavor
    module: str
    extra: tuple[str, ...] = ()
    pythonpath: tuple[str, ...] = ()  # before this checkout's (a baseline's src, adapters)

    def argv(self, port: int, workdir: Path) -> list[str]:
        extra = [a.replace("{workdir}", str(workdir)) for a in self.extra]
        return [sys.executable, "-m", self.module, "--port", str(port), *extra]


SERVERS: dict[str, ServerSpec] = {
    "chatcore": ServerSpec("chatcore", Flavor(CHATCORE), "benchmarks.chatcore_launch"),
    # The same server, spoken to in plain-text mode (no subprotocol: a frame is a message).
    "chatcore-plain": ServerSpec(
        "chatcore-plain", Flavor(CHATCORE_PLAIN), "benchmarks.chatcore_launch"
    ),
    "chatcore-sqlite": ServerSpec(
        "chatcore-sqlite",
        Flavor(CHATCORE),
        "benchmarks.chatcore_launch",
        ("--db", "sqlite:///{workdir}/bench.db"),
    ),
    "websockets": ServerSpec("websockets", Flavor(PLAIN), "benchmarks.peers.websockets_server"),
    "picows": ServerSpec("picows", Flavor(PLAIN), "benchmarks.peers.picows_server"),
    # The ceiling: fan-out and nothing else, on wsproto (see peers/wsproto_server.py).
    "wsproto-min": ServerSpec("wsproto-min", Flavor(PLAIN), "benchmarks.peers.wsproto_server"),
    "socketio": ServerSpec("socketio", Flavor(SOCKETIO), "benchmarks.peers.socketio_server"),
    # The ASGI path: chatcore's ChatApp and python-socketio's ASGIApp under the same servers.
    "chatcore-uvicorn": ServerSpec(
        "chatcore-uvicorn", Flavor(CHATCORE), "benchmarks.asgi_launch", ("--server", "uvicorn")
    ),
    "chatcore-hypercorn": ServerSpec(
        "chatcore-hypercorn", Flavor(CHATCORE), "benchmarks.asgi_launch", ("--server", "hypercorn")
    ),
    "socketio-uvicorn": ServerSpec(
        "socketio-uvicorn", Flavor(SOCKETIO), "benchmarks.peers.socketio_asgi_server"
    ),
}


def add_baseline(checkout: Path) -> list[str]:
    """Register ``chatcore-baseline`` and ``chatcore-plain-baseline``: the same launcher
    with another checkout's ``src`` and ``adapters`` first on the path (before/after
    in one run). Returns their names."""
    path = tuple(str(checkout.resolve() / d) for d in ("src", "adapters"))
    if not (checkout / "src" / "chatcore").is_dir():
        raise SystemExit(f"--baseline {checkout}: no src/chatcore there")
    names = []
    for base, kind in (("chatcore", CHATCORE), ("chatcore-plain", CHATCORE_PLAIN)):
        name = f"{base}-baseline"
        SERVERS[name] = ServerSpec(name, Flavor(kind), "benchmarks.chatcore_launch", (), path)
        names.append(name)
    return names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RunningServer:
    """One server process pinned to ``core``; stopped by :meth:`stop` (always bounded)."""

    def __init__(self, spec: ServerSpec, core: int | None) -> None:
        self.spec = spec
        self.port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix=f"chatcore-bench-{spec.name}-"))
        self.log_path = self.workdir / "server.log"
        argv = spec.argv(self.port, self.workdir)
        if core is not None and shutil.which("taskset"):
            argv = ["taskset", "-c", str(core), *argv]
        if PRIORITY and shutil.which("nice"):
            argv = ["nice", "-n", str(PRIORITY), *argv]
        path = [str(ROOT), *spec.pythonpath, os.environ.get("PYTHONPATH", "")]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=env
        )
        self._wait_listening(20.0)

    @property
    def pid(self) -> int:
        return self.proc.pid  # taskset execs the server: same pid

    def _wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.spec.name} exited at start:\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.spec.name} did not listen within {timeout}s")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        with contextlib.suppress(OSError):
            shutil.rmtree(self.workdir)
