"""The launcher's supervision rules, with tiny real child processes standing in for orchestrator and trainer."""

from __future__ import annotations

import os
import sys
import time

import pytest

from apprentice.launcher import supervise


def child(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_clean_stop_lets_the_trainer_drain_then_returns_the_stop_code(capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    drained_after_s = 1.0
    code = supervise(
        {"orchestrator": child("import sys; sys.exit(3)"), "trainer": child("import time; time.sleep(60)")},
        env=dict(os.environ), must_finish="trainer", stop_code=3,
        drained=lambda: time.monotonic() - started > drained_after_s,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert code == 3
    assert drained_after_s <= elapsed < 30  # waited for the drain, then stopped the trainer (not its 60 s)
    assert "stopped cleanly" in capsys.readouterr().err


def test_any_other_exit_code_is_a_failure_that_stops_the_others(capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    code = supervise(
        {"orchestrator": child("import sys; sys.exit(1)"), "trainer": child("import time; time.sleep(60)")},
        env=dict(os.environ), must_finish="trainer", stop_code=3, drained=lambda: False,
    )  # fmt: skip
    assert code == 1 and time.monotonic() - started < 30
    assert "the orchestrator failed (exit code 1); stopping trainer" in capsys.readouterr().err
