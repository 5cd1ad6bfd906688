"""SIGTERM to a launcher stops its children (a scheduler's or a user's `kill` must not orphan a server)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = """
import os, sys
from apprentice.launcher import supervise
child = [sys.executable, "-c", "import os, time; print(os.getpid(), flush=True); time.sleep(600)"]
sys.exit(supervise({"server": child, "worker": child}, env=dict(os.environ), must_finish="worker", services=("server",)))
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigterm_stops_every_child(tmp_path: Path) -> None:
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    launcher = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert launcher.stdout is not None
    pids = [int(launcher.stdout.readline().split()[-1]) for _ in range(2)]  # "[server] 123", "[worker] 456"
    assert all(alive(pid) for pid in pids)
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=30) == 130
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in pids)
    assert "stopping all processes" in (launcher.stderr.read() if launcher.stderr else "")
