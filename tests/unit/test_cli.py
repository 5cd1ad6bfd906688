"""The `apprentice` command line: help, dry runs, errors without tracebacks, mode checks, secrets.

Help, dry-run and failure cases run the real program as a subprocess; the rest call `main()` in-process.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from config_samples import MINIMAL, RL_CONFIG

from apprentice.cli import COMMANDS, main
from apprentice.config import Config, load_config


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "apprentice", *args], capture_output=True, text=True, env=full_env, timeout=60
    )


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- subprocess: the real program ---------------------------------------------------------------------------


def test_help_lists_one_line_per_command() -> None:
    result = run_cli("--help")
    assert result.returncode == 0 and result.stderr == ""
    lines = result.stdout.splitlines()
    for command in COMMANDS:
        matching = [line for line in lines if line.startswith(f"  {command} ")]
        assert len(matching) == 1, (command, matching)
        assert len(matching[0].split(None, 1)[1]) > 10  # the line says something about the command


def test_dry_run_prints_resolved_config_that_revalidates_and_hides_the_key() -> None:
    secret = "sk-" + secrets.token_hex(24)
    result = run_cli("distill", str(MINIMAL), "--dry-run", env={"TEACHER_API_KEY": secret})
    assert result.returncode == 0, result.stderr
    assert secret not in result.stdout and secret not in result.stderr
    parsed = tomllib.loads(result.stdout)
    assert Config.model_validate(parsed) == load_config([MINIMAL])
    assert parsed["orchestrator"]["rollout_model"]["api_key_var"] == "TEACHER_API_KEY"
    # Fully resolved: defaults the file never mentions are spelled out.
    assert parsed["orchestrator"]["max_concurrency"] == 32 and parsed["trainer"]["ckpt"]["keep"] == 2


def test_dry_run_with_overrides_and_several_files(tmp_path: Path) -> None:
    extra = write(tmp_path, "extra.toml", "[trainer]\nmax_steps = 4\n")
    result = run_cli("distill", str(MINIMAL), str(extra), "--trainer.optim.lr", "3e-6", "--dry-run")
    assert result.returncode == 0, result.stderr
    parsed = tomllib.loads(result.stdout)
    assert parsed["trainer"]["max_steps"] == 4 and parsed["trainer"]["optim"]["lr"] == 3e-6


def test_validation_failure_exits_nonzero_with_message_and_no_traceback() -> None:
    result = run_cli("distill", str(MINIMAL), "--trainer.loss.type", "rl", "--dry-run")
    assert result.returncode != 0
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert "trainer.loss.type" in result.stderr and "orchestrator.rollout_model" in result.stderr
    assert result.stderr.startswith("apprentice distill: error: invalid config")


def test_syntax_error_and_missing_file_fail_cleanly(tmp_path: Path) -> None:
    bad = write(tmp_path, "bad.toml", "[model\nname = 1\n")
    result = run_cli("distill", str(bad), "--dry-run")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert str(bad) in result.stderr and "line 1" in result.stderr
    result = run_cli("rl", str(tmp_path / "absent.toml"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "config file not found" in result.stderr and "absent.toml" in result.stderr


# --- in-process ---------------------------------------------------------------------------------------------


def test_unknown_command_suggests_the_closest(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["distil", str(MINIMAL)]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'distil'" in err and "did you mean 'distill'?" in err and "--help" in err
    assert main(["orchestrat"]) == 2
    assert "did you mean 'orchestrate'?" in capsys.readouterr().err


def test_no_arguments_prints_usage_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: apprentice COMMAND" in capsys.readouterr().out


def test_command_without_config_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["distill", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "no config file given" in err and "CONFIG.toml" in err


def test_rl_dry_run_prints_the_resolved_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rl = write(tmp_path, "rl.toml", RL_CONFIG)
    assert main(["rl", str(rl), "--orchestrator.rollouts_per_prompt", "4", "--dry-run"]) == 0
    dumped = tomllib.loads(capsys.readouterr().out)
    assert dumped["inference"]["port"] == 8123 and dumped["trainer"]["loss"]["type"] == "rl"
    assert dumped["orchestrator"]["advantage"] == "group" and dumped["orchestrator"]["rollouts_per_prompt"] == 4


def test_rl_group_advantages_need_several_rollouts_per_prompt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rl = write(tmp_path, "rl.toml", RL_CONFIG)
    for extra in ([], ["--dry-run"]):  # checked before anything starts, and under --dry-run too
        assert main(["rl", str(rl), *extra]) == 2
        out = capsys.readouterr()
        assert out.out == ""
        assert "orchestrator.rollouts_per_prompt = 1" in out.err and "rollouts_per_prompt >= 2" in out.err
        assert 'advantage = "reward"' in out.err and "Traceback" not in out.err
    assert main(["rl", str(rl), "--orchestrator.advantage", "reward", "--dry-run"]) == 0


def test_rl_loss_needs_the_token_client(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rl = write(tmp_path, "rl.toml", RL_CONFIG)
    args = ["--orchestrator.rollouts_per_prompt", "2", "--orchestrator.use_token_client", "false", "--dry-run"]
    assert main(["rl", str(rl), *args]) == 2
    err = capsys.readouterr().err
    assert "orchestrator.use_token_client must be true" in err and 'trainer.loss.type = "rl"' in err


def test_distill_with_rl_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rl = write(tmp_path, "rl.toml", RL_CONFIG)
    assert main(["distill", str(rl), "--dry-run"]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert "`apprentice distill` needs a distill-mode config" in out.err
    assert "[orchestrator.rollout_model]" in out.err and "use_token_client = false" in out.err
    assert 'type = "sft"' in out.err


def test_rl_with_distill_config_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rl", str(MINIMAL), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "`apprentice rl` needs an rl-mode config" in err
    assert "[orchestrator.rollout_model]" in err and "[inference]" in err


def test_rule_errors_reach_stderr_in_process(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["distill", str(MINIMAL), "--orchestrator.use_token_client=true", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "orchestrator.use_token_client" in err and "use_token_client = false" in err
    assert main(["distill", str(MINIMAL), "--trainer.optim.lrr", "1e-4", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'lrr' in [trainer.optim] [from command line]" in err and "Did you mean 'lr'?" in err


def test_dry_run_flag_anywhere_among_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["distill", str(MINIMAL), "--dry-run", "--orchestrator.sampling.stop", '["a", "b"]', "--seed=5"]
    assert main(argv) == 0
    parsed = tomllib.loads(capsys.readouterr().out)
    assert parsed["orchestrator"]["sampling"]["stop"] == ["a", "b"] and parsed["seed"] == 5


def test_train_and_orchestrate_dry_run(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("train", "orchestrate"):
        assert main([command, str(MINIMAL), "--trainer.max_steps", "3", "--dry-run"]) == 0
        assert tomllib.loads(capsys.readouterr().out)["trainer"]["max_steps"] == 3


def test_eval_needs_model_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(MINIMAL), "--dry-run"]) == 2
    assert "eval needs --model" in capsys.readouterr().err
    assert main(["eval", str(MINIMAL), "--model", "some/dir", "--dry-run"]) == 0
    assert "[model]" in capsys.readouterr().out


def test_secret_absent_from_dry_run_in_process(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    secret = "sk-" + secrets.token_urlsafe(32)
    monkeypatch.setenv("TEACHER_API_KEY", secret)
    assert main(["distill", str(MINIMAL), "--dry-run"]) == 0
    out = capsys.readouterr()
    assert secret not in out.out and secret not in out.err
    # A key pasted where the variable name belongs is rejected without being printed back.
    assert main(["distill", str(MINIMAL), "--orchestrator.rollout_model.api_key_var", secret, "--dry-run"]) == 2
    out = capsys.readouterr()
    assert secret not in out.out and secret not in out.err and "api_key_var" in out.err


def test_distill_fails_fast_when_the_key_variable_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("TEACHER_API_KEY", raising=False)
    code = main(["distill", str(MINIMAL), "--output_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert "TEACHER_API_KEY" in err and "export TEACHER_API_KEY=" in err
    assert not (tmp_path / "run").exists()  # nothing was started or written


def test_dry_run_checks_environment_ids_and_args(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["distill", str(MINIMAL), "--orchestrator.env.0.args", '{path = "a.jsonl", eval_pth = "b.jsonl"}', "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "orchestrator.env[0]" in err and "eval_pth" in err and "did you mean 'eval_path'" in err
    assert main(["distill", str(MINIMAL), "--orchestrator.env.0.id", "promts", "--dry-run"]) == 2
    assert "did you mean 'prompts'" in capsys.readouterr().err
    # Import-path environments are not imported at validation time (user code may need the run's machine).
    assert main(["distill", str(MINIMAL), "--orchestrator.env.0.id", "my_pkg.envs:make", "--dry-run"]) == 0
