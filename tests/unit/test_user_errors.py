"""Every expected failure is one message naming the file or key and the fix, an exit code, and no traceback.

Each case runs the real `apprentice` command: in-process through `cli.main` (fast), and the process entry points
(`python -m apprentice orchestrate`, `python -m apprentice.trainer.train`) as subprocesses, where a traceback
would show on stderr. Exit codes: 2 for the config or the command line, 1 for a runtime failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from apprentice.cli import main
from apprentice.handoff.rollouts import rank_file, write_step_batch
from apprentice.testing.tiny import save_tiny_student
from apprentice.types import TrainingSample


@pytest.fixture(scope="module")
def student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_student(tmp_path_factory.mktemp("student") / "tiny")


@pytest.fixture(scope="module")
def nan_student(student: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny student with one NaN in its final norm: every logit, hence the loss, is NaN."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("nan") / "student"
    model = AutoModelForCausalLM.from_pretrained(student)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(student).save_pretrained(out)
    return out


def config(tmp_path: Path, student: Path, env: str = "") -> Path:
    path = tmp_path / "run.toml"
    path.write_text(f"""
output_dir = "{tmp_path / 'out'}"
[model]
name = "{student}"
[orchestrator]
batch_size = 2
use_token_client = false
[orchestrator.rollout_model]
base_url = "http://127.0.0.1:9/v1"
model = "teacher"
[trainer]
max_steps = 1
micro_batch_tokens = 64
[trainer.loss]
type = "sft"
[log]
progress = false
""" + env)
    return path


def batch(tmp_path: Path, *, ranks: int = 1, length: int = 8) -> None:
    sample = TrainingSample(list(range(1, length + 1)), [False] * (length // 2) + [True] * (length - length // 2), [0.0] * length)
    write_step_batch(tmp_path / "out", 1, [[sample]] + [[] for _ in range(ranks - 1)])


def foreign_ids_batch(tmp_path: Path) -> None:
    """A step batch holding a token id far beyond the tiny student's vocabulary (another tokenizer's ids)."""
    sample = TrainingSample([1, 2, 3, 100_000, 5, 6], [False, False, False, True, True, True], [0.0] * 6)
    write_step_batch(tmp_path / "out", 1, [[sample]])


def corrupt_batch(tmp_path: Path) -> None:
    batch(tmp_path)
    path = rank_file(tmp_path / "out", 1, 0)
    path.write_bytes(path.read_bytes()[:-7] + b"garbage")


def corrupt_checkpoint(tmp_path: Path) -> None:
    """A complete checkpoint whose manifest lists a file that is not there (the only checkpoint of the run)."""
    ckpt = tmp_path / "out" / "checkpoints" / "step_1"
    ckpt.mkdir(parents=True)
    (ckpt / "COMPLETE").write_text(json.dumps({"step": 1, "format": 2}))
    (ckpt / "MANIFEST.json").write_text(json.dumps({"files": {"trainer_state.json": {"size": 2, "sha256": "0" * 64}}}))


@dataclass
class Case:
    name: str
    args: Callable[[Path, Path], list[str]]
    """(run dir with run.toml, student) -> the command line after `apprentice`."""
    code: int
    message: list[str]
    """Fragments the one-line message must hold: the file or key, and the fix."""
    prepare: Callable[[Path], None] | None = None
    nan: bool = False


CASES = [
    Case("bad model path", lambda d, s: ["train", str(d / "run.toml"), "--model.name", str(d / "no-such-model")], 2,
         ["model.name", "no-such-model", "no such model directory", "Fix"]),
    Case("model dir without weights", lambda d, s: ["orchestrate", str(d / "run.toml"), "--model.name", str(d)], 2,
         ["model.name", "without config.json", "Fix"]),
    Case("bad --num-tasks", lambda d, s: ["eval", str(d / "run.toml"), "--model", "http://127.0.0.1:9/v1", "--num-tasks", "all"], 2,
         ["--num-tasks", "'all'", "positive whole number"]),
    Case("eval of a missing model", lambda d, s: ["eval", str(d / "run.toml"), "--model", str(d / "missing")], 2,
         ["--model", "missing", "neither an http(s) URL nor an existing directory"]),
    Case("batch timeout", lambda d, s: ["train", str(d / "run.toml"), "--trainer.batch_timeout_s", "0.3"], 1,
         ["no step batch", "step_1", "trainer.batch_timeout_s"]),
    Case("corrupt step batch", lambda d, s: ["train", str(d / "run.toml")], 1,
         ["rank_0.safetensors", "corrupt", "then rerun"], prepare=corrupt_batch),
    Case("world-size mismatch", lambda d, s: ["train", str(d / "run.toml")], 1,
         ["split for 2 rank(s)", "trainer.num_processes = 1"], prepare=lambda d: batch(d, ranks=2)),
    Case("corrupt checkpoint", lambda d, s: ["train", str(d / "run.toml")], 1,
         ["passes verification", "step_1", "missing", "move the checkpoints directory aside"], prepare=corrupt_checkpoint),
    Case("token id beyond the embedding", lambda d, s: ["train", str(d / "run.toml")], 1,
         ["rollouts/step_1", "token id 100000", "sample 0, position 3", "embedding has", "model.tokenizer", "Delete"],
         prepare=foreign_ids_batch),
    Case("non-finite loss", lambda d, s: ["train", str(d / "run.toml")], 1,
         ["non-finite loss", "trainer.optim.lr", "rollouts/step_1"], prepare=batch, nan=True),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_user_error(case: Case, student: Path, nan_student: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config(tmp_path, nan_student if case.nan else student)
    if case.prepare is not None:
        case.prepare(tmp_path)
    try:
        code = main(case.args(tmp_path, student))
    except SystemExit as e:  # a process's own main() exits with the error's code
        code = int(e.code or 0)
    err = capsys.readouterr().err
    assert code == case.code, err
    lines = [line for line in err.splitlines() if line.startswith("apprentice")]  # not transformers' load bars
    assert len(lines) == 1 and "error:" in lines[0], err  # one message
    for fragment in case.message:
        assert fragment in lines[0], (fragment, lines[0])


def run_process(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=120)


def test_orchestrator_process_reports_a_missing_data_file_without_traceback(student: Path, tmp_path: Path) -> None:
    missing = tmp_path / "data" / "train.jsonl"
    env = f'[[orchestrator.env]]\nid = "prompts"\nargs = {{ path = "{missing}" }}\n'
    proc = run_process("-m", "apprentice", "orchestrate", str(config(tmp_path, student, env)))
    assert proc.returncode == 2, proc.stderr
    assert str(missing) in proc.stderr and "does not exist" in proc.stderr and "args.path" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_trainer_run_as_a_module_reports_a_batch_timeout_without_traceback(student: Path, tmp_path: Path) -> None:
    proc = run_process("-m", "apprentice.trainer.train", str(config(tmp_path, student)), "--trainer.batch_timeout_s", "0.3")
    assert proc.returncode == 1, proc.stderr
    assert "no step batch" in proc.stderr and "trainer.batch_timeout_s" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unexpected_errors_keep_their_traceback(student: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug is not a user error: neither cli.main nor the orchestrator's main() turns it into a message."""
    (tmp_path / "crashing_env.py").write_text("def make():\n    raise ZeroDivisionError('bug in the factory')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    env = '[[orchestrator.env]]\nid = "crashing_env:make"\n'
    with pytest.raises(ZeroDivisionError, match="bug in the factory"):
        main(["orchestrate", str(config(tmp_path, student, env))])


def test_rl_with_a_student_that_does_not_exist_fails_before_starting_anything(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rl_config = Path(__file__).resolve().parents[2] / "configs" / "rl-tiny-letters.toml"
    missing = tmp_path / "no-such-model"
    code = main(["rl", str(rl_config), "--model.name", str(missing), "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "model.name" in err and "no such model directory" in err
    assert not (tmp_path / "out").exists()  # nothing written, nothing started
