"""Start `apprentice serve` as a child process on a free loopback port and wait until it answers."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def local_server(model: str | Path, *, extra_args: list[str] | None = None, timeout_s: float = 300.0, log_path: Path | None = None) -> Iterator[str]:
    """Serve `model` on 127.0.0.1 for the duration of the block; yields the base URL (".../v1")."""
    port = free_port()
    command = [sys.executable, "-m", "apprentice", "serve", str(model), "--port", str(port), *(extra_args or [])]
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "a") if log_path else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                where = f"; its log is {log_path}" if log_path else ""
                raise RuntimeError(f"`apprentice serve {model}` exited with code {proc.returncode} before it was ready{where}")
            try:
                if httpx.get(f"{base_url}/models", timeout=2.0).status_code < 500:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"`apprentice serve {model}` did not answer within {timeout_s:.0f} s")
            time.sleep(0.5)
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log_path:
            log.close()  # type: ignore[union-attr]
