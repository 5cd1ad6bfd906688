"""Resuming a run directory with a config that would make it another run is refused, naming the keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from apprentice.config import ConfigError, load_config, write_resolved
from apprentice.config.resume import check_resumable

MINIMAL = Path(__file__).resolve().parents[2] / "configs" / "distill-minimal.toml"


def test_first_run_is_not_a_resume(tmp_path: Path) -> None:
    assert check_resumable(load_config([MINIMAL], ["--output_dir", str(tmp_path / "run")])) is False


def started(tmp_path: Path, out: list[str]) -> None:
    """A run that got as far as writing its config and its first step batch."""
    write_resolved(load_config([MINIMAL], out))
    (tmp_path / "run" / "rollouts" / "step_1").mkdir(parents=True)


def test_operational_changes_resume(tmp_path: Path) -> None:
    out = ["--output_dir", str(tmp_path / "run")]
    started(tmp_path, out)
    later = load_config([MINIMAL], [*out, "--trainer.max_steps", "50", "--trainer.optim.lr", "1e-4",
                                    "--orchestrator.rollout_model.base_url", "http://10.0.0.2:8000/v1",
                                    "--orchestrator.max_concurrency", "4"])  # fmt: skip
    assert check_resumable(later) is True


def test_identity_changes_are_refused_with_the_keys(tmp_path: Path) -> None:
    out = ["--output_dir", str(tmp_path / "run")]
    started(tmp_path, out)
    other = load_config([MINIMAL], [*out, "--orchestrator.batch_size", "16", "--orchestrator.env.0.args.path", "other.jsonl",
                                    "--orchestrator.sampling.temperature", "1.0"])  # fmt: skip
    with pytest.raises(ConfigError) as info:
        check_resumable(other)
    message = str(info.value)
    for key in ("orchestrator.batch_size", "orchestrator.env", "orchestrator.sampling.temperature"):
        assert key in message
    assert "output_dir" in message and "max_steps" not in message


def test_an_attempt_that_wrote_no_step_does_not_lock_its_config(tmp_path: Path) -> None:
    """A first attempt that failed before any step (a missing data file, a wrong model name) left only its
    config.toml: the corrected rerun was refused as "a different run" until the directory was deleted."""
    out = ["--output_dir", str(tmp_path / "run")]
    write_resolved(load_config([MINIMAL], out))
    fixed = load_config([MINIMAL], [*out, "--orchestrator.env.0.args.path", "the-right-file.jsonl"])
    assert check_resumable(fixed) is False  # a fresh start: the launcher writes the corrected config
    (tmp_path / "run" / "checkpoints" / "step_2").mkdir(parents=True)
    with pytest.raises(ConfigError, match="orchestrator.env"):
        check_resumable(fixed)
