#!/usr/bin/env python3
"""Set up and run chatcore with nothing but Python 3.11+ on the machine.

    python3 dev.py serve [ARGS...]   set up .venv, start the example chat server
    python3 dev.py check             set up .venv, run every check (ruff, mypy, pytest)
    python3 dev.py bench [ARGS...]   set up .venv, run the benchmarks

The virtual environment lives in .venv and is refreshed when pyproject.toml
changes. Set CHATCORE_VENV to put it elsewhere.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("CHATCORE_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"


def run(*args: str | Path, check: bool = True) -> int:
    print("+", " ".join(str(a) for a in args), flush=True)
    return subprocess.run([str(a) for a in args], cwd=ROOT, check=check).returncode


def setup(extras: str) -> None:
    if sys.version_info < (3, 11):
        sys.exit(f"chatcore needs Python 3.11 or newer, this is {sys.version.split()[0]}")
    stamp = VENV / f".chatcore-{extras}"
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == want and PY.exists():
        return
    if not PY.exists():
        print(f"creating virtual environment in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    run(PY, "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    run(PY, "-m", "pip", "install", "--quiet", "-e", f".[{extras}]")
    stamp.write_text(want)


# Coverage floors per area, a little under what the full suite measures on main
# (branch coverage, counting the ``chatcore serve`` processes that tests start:
# see [tool.coverage.run] in pyproject.toml). They hold for the full suite as CI
# runs it, PostgreSQL and chromium included; a run given extra pytest arguments
# prints the report and checks no floor.
COVERAGE_FLOORS = {"src/chatcore/*": 97, "adapters/*": 87}


def check() -> int:
    setup("dev")
    root = getattr(os, "geteuid", lambda: -1)() == 0
    if os.environ.get("CI") == "true" and root and not Path("/usr/bin/chromium").exists():
        # The browser tests drive Debian's chromium; a fresh CI machine lacks it.
        run("apt-get", "update", check=False)
        run("apt-get", "install", "-y", "chromium", check=False)
    extra = sys.argv[2:]
    steps = [
        (BIN / "ruff", "check", "src", "adapters", "tests", "benchmarks", "examples", "dev.py"),
        (BIN / "mypy", "--strict", "src/chatcore", "adapters"),
        (PY, "-m", "pytest", "--cov", "--cov-report=term", *extra),
    ]
    for step in steps:
        code = run(*step, check=False)
        if code != 0:
            print(f"FAILED: {' '.join(str(s) for s in step)} (exit {code})", flush=True)
            return code
    floors = {} if extra else COVERAGE_FLOORS
    for area, floor in floors.items():
        report = (PY, "-m", "coverage", "report", "--format=total", f"--include={area}")
        code = run(*report, f"--fail-under={floor}", check=False)
        if code != 0:
            print(
                f"FAILED: coverage of {area} is under its floor of {floor}%"
                " (were tests skipped? CI runs them all)",
                flush=True,
            )
            return code
    print("all checks passed", flush=True)
    return 0


def serve() -> int:
    setup("server")
    command = [str(PY), "-m", "chatcore_server", "serve", *sys.argv[2:]]
    print("+", " ".join(command), flush=True)
    # The caller's directory, not ROOT: the default --db is chatcore.db "here".
    child = subprocess.Popen(command)
    # Ctrl-C reaches the server directly (same process group); it shuts down
    # gracefully, so this process must wait for it rather than die first.
    signal.signal(signal.SIGINT, lambda signum, frame: None)
    signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signum))
    return child.wait()


def bench() -> int:
    setup("dev,bench")
    return run(PY, "-m", "benchmarks", *sys.argv[2:], check=False)


def main() -> int:
    commands = {"check": check, "serve": serve, "bench": bench}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        print(__doc__)
        return 2
    return commands[sys.argv[1]]()


if __name__ == "__main__":
    sys.exit(main())
