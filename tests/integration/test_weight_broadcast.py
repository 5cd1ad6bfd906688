"""`trainer.weight_broadcast = "collective"`: weights from the trainer's memory to `apprentice serve` over a gloo
group (apprentice/collective.py, trainer/broadcast.py, inference/collective.py). Real server on loopback, real
tiny model, real torch.distributed group; the trainer side runs in the test process."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fault_teacher import serve_asgi
from test_rl_e2e import rl_command, rl_env, write_rl_config

from apprentice import collective
from apprentice.handoff.hfdir import full_state_dict
from apprentice.handoff.weights import published_steps
from apprentice.inference.launch import free_port
from apprentice.inference.server import build_app
from apprentice.loader import load_causal_lm
from apprentice.metrics import read_metrics
from apprentice.testing.tiny import save_tiny_student
from apprentice.trainer.broadcast import BroadcastError, WeightSender

MESSAGES = [{"role": "user", "content": "Say something about 3."}]


def sample(base_url: str) -> tuple[list[int], list[int], list[float]]:
    """(prompt ids, completion ids, the server's logprob of each completion id)."""
    body = {"model": "student", "messages": MESSAGES, "max_tokens": 12, "temperature": 1.0, "seed": 3,
            "logprobs": True, "return_token_ids": True}  # fmt: skip
    response = httpx.post(f"{base_url}/chat/completions", json=body, timeout=60.0)
    response.raise_for_status()
    out = response.json()
    choice = out["choices"][0]
    return out["prompt_token_ids"], choice["token_ids"], [e["logprob"] for e in choice["logprobs"]["content"]]


def trainer_logprobs(model: Any, prompt: list[int], completion: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + completion])).logits[0].float()
    logprobs = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    return logprobs.gather(-1, torch.tensor(completion)[:, None])[:, 0]


def trained(student: Path) -> Any:
    """The trainer's model after one real optimizer step (so its weights differ from the server's)."""
    model = load_causal_lm(student, dtype=torch.float32, device="cpu").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    return model.eval()


def status(base_url: str) -> dict[str, Any]:
    return dict(httpx.get(f"{base_url}/weights", timeout=10.0).json())


def apply(base_url: str, step: int) -> httpx.Response:
    return httpx.post(f"{base_url}/weights/apply", json={"step": step}, timeout=30.0)


def test_a_collective_update_reaches_the_server_exactly(tmp_path: Path) -> None:
    student = save_tiny_student(tmp_path / "student", seed=0)
    model = trained(student)
    with serve_asgi(build_app(student, dtype="float32", device="cpu", batch_window_s=0.0)) as base_url:
        prompt, before, before_lps = sample(base_url)
        sender = WeightSender(base_url, timeout_s=30.0)
        try:
            sender.send(full_state_dict(model), step=1)
            assert status(base_url)["staged"] == 1
            assert sample(base_url)[1:] == (before, before_lps)  # staged, not served until applied
            assert apply(base_url, 1).status_code == 200
            assert status(base_url)["step"] == 1 and status(base_url)["staged"] is None
            prompt, completion, served = sample(base_url)
            assert served != before_lps
            expected = trainer_logprobs(model, prompt, completion)
            assert torch.allclose(torch.tensor(served), expected, atol=1e-5, rtol=0.0), (served, expected.tolist())
            # The next step's update goes over the same group.
            with torch.no_grad():
                model.lm_head.weight.mul_(2.0)  # tied to the embeddings
            sender.send(full_state_dict(model), step=2)
            assert apply(base_url, 2).status_code == 200
            prompt, completion, served = sample(base_url)
            assert torch.allclose(torch.tensor(served), trainer_logprobs(model, prompt, completion), atol=1e-5, rtol=0.0)
            # The trainer sends step 4 before the orchestrator (delayed by an evaluation) applies step 3: applying 3
            # serves the newer update that replaced it, and says so; nothing older than what is asked is served.
            sender.send(full_state_dict(model), step=3)
            with torch.no_grad():
                model.lm_head.weight.mul_(0.5)
            sender.send(full_state_dict(model), step=4)
            late = apply(base_url, 3)
            assert late.status_code == 200 and late.json()["step"] == 4 and status(base_url)["step"] == 4
            prompt, completion, served = sample(base_url)
            assert torch.allclose(torch.tensor(served), trainer_logprobs(model, prompt, completion), atol=1e-5, rtol=0.0)
            assert apply(base_url, 5).status_code == 409  # none staged
        finally:
            sender.close()


def test_a_partial_update_never_serves_mixed_weights(tmp_path: Path) -> None:
    student = save_tiny_student(tmp_path / "student", seed=0)
    model = trained(student)
    state = full_state_dict(model)
    with serve_asgi(build_app(student, dtype="float32", device="cpu", batch_window_s=0.0)) as base_url:
        prompt, completion, original = sample(base_url)
        # A trainer that dies halfway: it sends the manifest and half of the tensors, then its group goes away.
        sender = WeightSender(base_url, timeout_s=5.0)
        sender._join_builtin()
        tensors = list(state.items())
        response = httpx.post(f"{base_url}/weights/collective/receive",
                              json={"step": 1, "tensors": collective.manifest(tensors)}, timeout=30.0)  # fmt: skip
        assert response.status_code == 200
        assert sender.group is not None
        for _, tensor in tensors[: len(tensors) // 2]:
            collective.broadcast(sender.group, tensor.contiguous())
        sender.group = None  # the group is dropped: the server's next read fails (or times out)
        deadline = time.monotonic() + 30.0
        while not status(base_url)["receive_error"] and time.monotonic() < deadline:
            time.sleep(0.05)
        held = status(base_url)
        assert held["receive_error"] and held["staged"] is None and held["step"] == 0 and held["group"] is False
        refused = apply(base_url, 1)
        assert refused.status_code == 409 and "no complete update of step 1" in refused.text
        assert sample(base_url) == (prompt, completion, original)  # the served weights are untouched

        # The trainer comes back: it joins again and the next update arrives whole.
        sender.send(state, step=2)
        assert apply(base_url, 2).status_code == 200
        prompt, completion, served = sample(base_url)
        assert torch.allclose(torch.tensor(served), trainer_logprobs(model, prompt, completion), atol=1e-5, rtol=0.0)
        sender.close()


def test_an_update_of_another_model_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    student = save_tiny_student(tmp_path / "student", seed=0)
    with serve_asgi(build_app(student, dtype="float32", device="cpu", batch_window_s=0.0)) as base_url:
        sender = WeightSender(base_url, timeout_s=10.0)
        with pytest.raises(BroadcastError, match="does not fit the served model"):
            sender.send({"model.embed_tokens.weight": torch.zeros(3, 3)}, step=1)
        assert status(base_url)["staged"] is None and status(base_url)["step"] == 0
        sender.close()


def test_rl_run_with_collective_updates_is_exact_and_writes_weights_only_at_checkpoints(tmp_path: Path) -> None:
    student = save_tiny_student(tmp_path / "student", seed=0)
    max_steps = 4
    config = write_rl_config(tmp_path, student, free_port(), max_steps)
    overrides = ["--trainer.weight_broadcast", "collective", "--trainer.ckpt.interval", "2", "--trainer.weights_keep", "9"]
    run = subprocess.run([*rl_command(config), *overrides], capture_output=True, text=True, env=rl_env(), timeout=400)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    output = tmp_path / "out"
    trainer = read_metrics(output / "trainer" / "metrics.jsonl")
    orchestrator = read_metrics(output / "orchestrator" / "metrics.jsonl")
    # Every step samples with the newest weights (max_async_level = 0), which came over the collective: the
    # server's logprobs equal the trainer's on every step, not only the first.
    assert [row["policy/step"] for row in orchestrator] == list(range(max_steps))
    assert all(row["rl/mismatch_kl"] < 1e-3 and row["rl/masked_fraction"] == 0.0 for row in trainer)
    assert all(row["perf/publish_s"] > 0 for row in trainer)
    assert published_steps(output) == [2, 4]  # the checkpoint steps: what a resumed run starts from
    assert "publishing step" not in run.stdout  # no update fell back to the disk
