"""Start `apprentice serve` as a child process on a free loopback port and wait until it answers."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running(command: list[str], ready_url: str, *, name: str, timeout_s: float, stdout: Any = subprocess.DEVNULL,
            exit_detail: Callable[[], str] = lambda: "") -> Iterator[subprocess.Popen[Any]]:  # fmt: skip
    """Run `command` for the duration of the block, once GET `ready_url` answers below 500. RuntimeError when it
    exits first (`exit_detail()` appended: where its log is), TimeoutError after `timeout_s`; terminated (then
    killed) at the end."""
    proc = subprocess.Popen(command, stdout=stdout, stderr=subprocess.STDOUT, env=dict(os.environ))
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode} before it was ready{exit_detail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(ready_url, timeout=2.0).status_code < 500:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} did not answer within {timeout_s:.0f} s")
            time.sleep(0.2)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def local_server(model: str | Path, *, extra_args: list[str] | None = None, timeout_s: float = 300.0, log_path: Path | None = None) -> Iterator[str]:
    """Serve `model` on 127.0.0.1 for the duration of the block; yields the base URL (".../v1")."""
    port = free_port()
    command = [sys.executable, "-m", "apprentice", "serve", str(model), "--port", str(port), *(extra_args or [])]
    base_url = f"http://127.0.0.1:{port}/v1"
    with contextlib.ExitStack() as stack:
        log: Any = subprocess.DEVNULL
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log = stack.enter_context(open(log_path, "a"))
        with running(command, f"{base_url}/models", name=f"`apprentice serve {model}`", timeout_s=timeout_s, stdout=log,
                     exit_detail=lambda: f"; its log is {log_path}" if log_path else ""):  # fmt: skip
            yield base_url
