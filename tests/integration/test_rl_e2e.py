"""rl mode for real: the built-in server, weight publishing and reloading, and `apprentice rl` end to end.

Everything is real (uvicorn on loopback, the tiny student, torch training, subprocesses); the environment is
`apprentice.testing.letters`, whose reward (the share of "a" in the answer) a policy gradient raises in a few steps.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi import FastAPI
from fault_teacher import serve_asgi
from transformers import AutoModelForCausalLM

from apprentice.config import Config, load_config
from apprentice.handoff.weights import publish, published_steps, verify
from apprentice.inference.launch import free_port
from apprentice.inference.server import build_app
from apprentice.metrics import read_metrics
from apprentice.orchestrator.loop import NothingToTrainError
from apprentice.orchestrator.loop import run as orchestrate
from apprentice.orchestrator.policy import PolicySync
from apprentice.testing.tiny import build_tiny_tokenizer, save_tiny_student
from apprentice.trainer import ckpt

HERE = Path(__file__).resolve().parent
MESSAGES = [{"role": "user", "content": "Say something about 3."}]


def student_endpoint_config(tmp_path: Path, student: Path, base_url: str, **orchestrator: Any) -> Config:
    path = tmp_path / "rl.toml"
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in orchestrator.items())
    path.write_text(f"""
output_dir = "{tmp_path / 'out'}"
[model]
name = "{student}"
[orchestrator]
batch_size = 4
rollouts_per_prompt = 2
{extra}[orchestrator.student_endpoint]
base_url = "{base_url}"
model = "student"
max_retries = 0
[orchestrator.sampling]
max_tokens = 8
[[orchestrator.env]]
id = "apprentice.testing.letters:make_letters_env"
[trainer]
max_steps = 1
[log]
progress = false
""")
    return load_config([path])


def sample_ids(base_url: str) -> list[int]:
    body = {"model": "student", "messages": MESSAGES, "max_tokens": 12, "temperature": 1.0, "seed": 7,
            "logprobs": True, "return_token_ids": True}  # fmt: skip
    response = httpx.post(f"{base_url}/chat/completions", json=body, timeout=60.0)
    response.raise_for_status()
    return list(response.json()["choices"][0]["token_ids"])


def test_published_weights_reloaded_into_the_server_change_its_answers(tmp_path: Path) -> None:
    student = save_tiny_student(tmp_path / "student", seed=0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(student)
    tokenizer = build_tiny_tokenizer()
    with serve_asgi(build_app(student, dtype="float32", device="cpu", batch_window_s=0.0)) as base_url:
        cfg = student_endpoint_config(tmp_path, student, base_url)
        before = sample_ids(base_url)
        assert sample_ids(base_url) == before  # same prompt, same seed, same weights: same answer
        publish(model, tokenizer, cfg.output_dir, 1, keep=3)  # unchanged weights
        with torch.no_grad():
            model.lm_head.weight.mul_(3.0)  # tied to the embeddings: a sharper, different policy
        publish(model, tokenizer, cfg.output_dir, 2, keep=3)

        async def load(step: int) -> None:
            sync = PolicySync(cfg)
            try:
                await sync.reload(step)
            finally:
                await sync.aclose()

        asyncio.run(load(2))
        after = sample_ids(base_url)
        assert after != before
        asyncio.run(load(1))  # back to the original weights: the original answer again
        assert sample_ids(base_url) == before


def test_a_server_without_token_ids_is_a_clear_error_at_the_first_step(tmp_path: Path) -> None:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "student", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat() -> dict[str, Any]:  # an OpenAI-compatible server that ignores return_token_ids
        return {"id": "x", "object": "chat.completion", "created": 0, "model": "student",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "aaa"}, "finish_reason": "stop"}]}  # fmt: skip

    student = save_tiny_student(tmp_path / "student")
    with serve_asgi(app) as base_url:
        cfg = student_endpoint_config(tmp_path, student, base_url)
        with pytest.raises(NothingToTrainError) as err:
            asyncio.run(orchestrate(cfg))
    message = str(err.value)
    assert message.startswith("step 1:") and "prompt_token_ids" in message and "use_token_client" in message
    assert not (Path(cfg.output_dir) / "rollouts" / "step_1").exists()


def write_rl_config(tmp_path: Path, student: Path, port: int, max_steps: int, max_tokens: int = 16) -> Path:
    """A first rl run as a new user writes it: orchestrator.truncated left at its default."""
    path = tmp_path / "rl.toml"
    path.write_text(f"""
output_dir = "{tmp_path / 'out'}"
seed = 0
[model]
name = "{student}"
[orchestrator]
batch_size = 16
rollouts_per_prompt = 4
max_async_level = 0
eval_interval = 4
eval_num_tasks = 4
[orchestrator.sampling]
max_tokens = {max_tokens}
temperature = 1.0
seed = 0
[[orchestrator.env]]
id = "apprentice.testing.letters:make_letters_env"
[trainer]
max_steps = {max_steps}
micro_batch_tokens = 1024
weights_keep = 2
[trainer.optim]
lr = 5e-2
[trainer.ckpt]
interval = 1
keep = 2
[inference]
port = {port}
threads = 1
[log]
progress = false
""")
    return path


def rl_command(config: Path) -> list[str]:
    return [sys.executable, "-m", "apprentice", "rl", str(config)]


def rl_env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[2] / "src")
    path = os.pathsep.join([src, str(HERE), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def progress(output: Path) -> int:
    path = output / "trainer" / "progress.json"
    try:
        return int(json.loads(path.read_text())["step"])
    except (FileNotFoundError, ValueError):
        return 0


def test_rl_run_learns_and_resumes_after_kill_9(tmp_path: Path) -> None:
    student = save_tiny_student(tmp_path / "student", seed=0)
    max_steps = 8
    config = write_rl_config(tmp_path, student, free_port(), max_steps)
    output = tmp_path / "out"
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(rl_command(config), stdout=log, stderr=subprocess.STDOUT, env=rl_env(), start_new_session=True)
    deadline = time.monotonic() + 240
    while progress(output) < 2:
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the first attempt made no progress"
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)  # the launcher, the server, the orchestrator and the trainer at once
    first.wait()
    log.close()
    resume_from = ckpt.latest_checkpoint(output)
    assert resume_from is not None
    newest = int(resume_from.name.removeprefix("step_"))

    second = subprocess.run(rl_command(config), capture_output=True, text=True, env=rl_env(), timeout=400)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    assert "resuming run" in second.stdout
    assert f"policy weights of step {newest} ({output / 'weights' / f'step_{newest}'})" in second.stdout

    trainer = read_metrics(output / "trainer" / "metrics.jsonl")
    orchestrator = read_metrics(output / "orchestrator" / "metrics.jsonl")
    assert [row["step"] for row in trainer] == list(range(1, max_steps + 1))  # none trained twice or skipped
    assert [row["step"] for row in orchestrator] == list(range(1, max_steps + 1))
    # Identical weights and exact token path: trainer and server logprobs agree at step 1 (fp32 on CPU).
    assert trainer[0]["rl/mismatch_kl"] < 1e-3 and trainer[0]["rl/masked_fraction"] == 0.0
    # Fully on-policy (max_async_level = 0): batch n is sampled with the weights of step n - 1.
    assert [row["policy/step"] for row in orchestrator] == list(range(max_steps))
    assert all(row["policy/lag"] == 0 for row in orchestrator)
    assert all(row["rl/mismatch_kl"] < 1e-3 for row in trainer)
    # Phase timings (issue 20): where a step's time goes, on both sides.
    assert all(0 < row["perf/train_s"] < 60 and 0 < row["perf/publish_s"] < 60 for row in trainer)
    assert all(0 < row["perf/sample_s"] < 120 and 0 <= row["perf/reload_s"] < 60 for row in orchestrator)
    assert all(row["perf/reload_s"] > 0 for row in orchestrator[1:] if row["step"] != newest + 1)  # new weights each step
    assert all(0 <= row["perf/eval_wait_s"] < 120 for row in orchestrator)
    rewards = [row["rollout/reward"] for row in orchestrator]
    assert sum(rewards[-3:]) / 3 > 2 * sum(rewards[:3]) / 3 + 0.05, rewards

    evals = read_metrics(output / "orchestrator" / "eval.jsonl")
    assert [(row["step"], row["policy/step"]) for row in evals] == [(1, 0), (5, 4), (max_steps + 1, max_steps)]
    assert all("eval/letters/reward" in row and row["perf/eval_s"] > 0 for row in evals)
    assert published_steps(output) == [max_steps - 1, max_steps]
    # final/ is the last step's published weights, linked rather than written a second time; it verifies.
    last = output / "weights" / f"step_{max_steps}"
    assert (output / "final" / "model.safetensors").stat().st_ino == (last / "model.safetensors").stat().st_ino
    verify(output / "final")
    assert AutoModelForCausalLM.from_pretrained(output / "final") is not None


def test_a_first_rl_run_trains_on_truncated_completions_by_default(tmp_path: Path) -> None:
    """A random tiny policy rambles: with max_tokens = 3 nearly every completion is cut off. rl mode keeps them by
    default (a rambling answer is a low-reward sample), so the first step trains instead of stopping with "none of
    the rollouts could be trained on"; --dry-run shows the value in force."""
    student = save_tiny_student(tmp_path / "student", seed=0)
    config = write_rl_config(tmp_path, student, free_port(), max_steps=1, max_tokens=3)
    dry = subprocess.run([*rl_command(config), "--dry-run"], capture_output=True, text=True, env=rl_env(), timeout=120)
    assert dry.returncode == 0 and 'truncated = "keep"' in dry.stdout, dry.stderr[-2000:]
    run = subprocess.run([*rl_command(config), "--orchestrator.eval_interval", "0"], capture_output=True, text=True,
                         env=rl_env(), timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    output = tmp_path / "out"
    (row,) = read_metrics(output / "orchestrator" / "metrics.jsonl")
    assert row["rollout/set_aside"] == 0 and row["render/samples"] == 16
    assert [r["step"] for r in read_metrics(output / "trainer" / "metrics.jsonl")] == [1]
