"""One weight update followed from the trainer's step to the server sampling with it, through the one path that
apprentice.handoff documents: publish -> PolicySync.reload -> Backend.reload (POST /v1/load_weights) -> verify
-> load -> swap. Everything is real: the tiny student, the trainer's own main() training one step on a stored
batch, the files it publishes, the orchestrator's PolicySync, and `apprentice serve`'s app under uvicorn.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import httpx
import pytest
import torch
from fault_teacher import serve_asgi
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from apprentice.config import Config
from apprentice.errors import ApprenticeError
from apprentice.handoff.paths import MANIFEST, MARKER
from apprentice.handoff.rollouts import write_step_batch
from apprentice.handoff.weights import latest_published, publish, verify, weights_dir
from apprentice.inference.server import build_app
from apprentice.inference.server import main as serve_main
from apprentice.orchestrator.policy import POLL_S, PolicySync
from apprentice.testing.tiny import build_tiny_tokenizer, save_tiny_student
from apprentice.trainer.train import main as train
from apprentice.types import TrainingSample


def rl_config(student: Path, output: Path, base_url: str, max_steps: int = 1) -> Config:
    return Config.model_validate({
        "output_dir": str(output), "model": {"name": str(student)},
        "orchestrator": {"max_async_level": 0, "student_endpoint": {"base_url": base_url, "model": "student"},
                         "env": [{"id": "apprentice.testing.letters:make_letters_env"}]},
        "trainer": {"max_steps": max_steps, "micro_batch_tokens": 64, "loss": {"type": "sft"}, "optim": {"lr": 5e-2},
                    "batch_timeout_s": 30.0},
        "log": {"progress": False},
    })  # fmt: skip


def served_weights(app: object) -> dict[str, torch.Tensor]:
    model = app.state.engine.model  # type: ignore[attr-defined]
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_one_weight_update_from_the_trainer_step_to_the_server(tmp_path: Path) -> None:
    student = save_tiny_student(tmp_path / "student", seed=0)
    output = tmp_path / "out"
    sample = TrainingSample(list(range(3, 23)), [False] * 5 + [True] * 15, [0.0] * 20, 1.0)
    write_step_batch(output, 1, [[sample, sample]])
    app = build_app(student, dtype="float32", device="cpu", batch_window_s=0.0)
    initial = served_weights(app)
    with serve_asgi(app) as base_url:
        cfg = rl_config(student, output, base_url)
        assert cfg.mode == "rl"

        # 1. publish: the trainer's step 1 writes OUTPUT/weights/step_1 (manifest, marker last).
        train(cfg)
        published = weights_dir(output, 1)
        assert (published / MARKER).is_file() and "model.safetensors" in json.loads((published / MANIFEST).read_text())["files"]
        trained = load_file(str(published / "model.safetensors"))

        # 2-5. reload: before batch 2 opens (async bound 0) the orchestrator needs the weights of step 1 and has
        # the server verify, load and swap them in.
        async def before_batch_2() -> int:
            sync = PolicySync(cfg)
            try:
                await sync.wait(2)
                return sync.policy_step()
            finally:
                await sync.aclose()

        assert asyncio.run(before_batch_2()) == 1
        assert httpx.get(f"{base_url}/weights", timeout=10).json() == {"step": 1, "path": str(published)}
    now = served_weights(app)
    assert any(not torch.equal(now[k], initial[k]) for k in trained)  # the step changed the served weights...
    assert all(torch.equal(now[k], trained[k]) for k in trained)  # ...into exactly what the trainer published
    assert app.state.engine.stats["inference/weights_step"] == 1


def test_damaged_weights_are_refused_in_one_line_and_set_aside_by_reload_and_serve(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    student = save_tiny_student(tmp_path / "student", seed=0)
    tokenizer = build_tiny_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(student)
    output = tmp_path / "out"
    publish(model, tokenizer, output, 3, keep=3)
    damaged = weights_dir(output, 3)
    truncate = damaged / "model.safetensors"
    truncate.write_bytes(truncate.read_bytes()[:1000])  # COMPLETE kept, as in the probe

    # `apprentice serve` started on it: one error line, exit 2, no traceback; the directory is set aside.
    capsys.readouterr()  # (the progress bars of the publish above)
    assert serve_main([str(damaged), "--dtype", "float32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: damaged published weights") and str(truncate) in err
    assert "Traceback" not in err and not damaged.exists() and latest_published(output) == 0

    # POST /v1/load_weights of a damaged directory: 400 naming it, set aside, the server keeps its weights.
    publish(model, tokenizer, output, 4, keep=3)
    flipped = weights_dir(output, 4) / "model.safetensors"
    with open(flipped, "r+b") as f:
        f.seek(flipped.stat().st_size // 2)
        f.write(b"\xff" * 8192)
    app = build_app(student, dtype="float32", device="cpu", batch_window_s=0.0)
    with serve_asgi(app) as base_url:
        r = httpx.post(f"{base_url}/load_weights", json={"path": str(weights_dir(output, 4)), "step": 4}, timeout=60)
        assert r.status_code == 400
        message = r.json()["error"]["message"]
        assert "\n" not in message and f"{flipped}: sha256 mismatch" in message and "step_4.damaged-" in message
        assert httpx.get(f"{base_url}/weights", timeout=10).json()["step"] == 0
    assert len(list((output / "weights").glob("step_*.damaged-*"))) == 2 and latest_published(output) == 0


def test_a_resumed_trainer_republishes_missing_weights_of_its_checkpoint(tmp_path: Path) -> None:
    """The issue's probe: `rm -rf weights/step_2`, rerun; the orchestrator waiting for them must not hang."""
    student = save_tiny_student(tmp_path / "student", seed=0)
    output = tmp_path / "out"
    sample = TrainingSample(list(range(3, 23)), [False] * 5 + [True] * 15, [0.0] * 20, 1.0)
    for step in (1, 2):
        write_step_batch(output, step, [[sample, sample]])
    app = build_app(student, dtype="float32", device="cpu", batch_window_s=0.0)
    with serve_asgi(app) as base_url:
        cfg = rl_config(student, output, base_url, max_steps=2)
        train(cfg)
        published = load_file(str(weights_dir(output, 2) / "model.safetensors"))
        shutil.rmtree(weights_dir(output, 2))
        assert latest_published(output) == 1

        train(cfg)  # resumes from checkpoint 2: nothing left to train, but its weights come back
        verify(weights_dir(output, 2))
        again = load_file(str(weights_dir(output, 2) / "model.safetensors"))
        assert all(torch.equal(published[k], again[k]) for k in published)

        async def before_batch_3() -> float:
            sync = PolicySync(cfg)
            sync.wait_timeout_s = POLL_S / 2  # past the first poll would be an error
            try:
                return await sync.wait(3)
            finally:
                await sync.aclose()

        asyncio.run(before_batch_3())
        assert httpx.get(f"{base_url}/weights", timeout=10).json()["step"] == 2


def test_a_student_endpoint_behind_an_api_key_gets_it_on_weight_reloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rollouts carried student_endpoint.api_key_var but the reloads did not: step 2 stopped with HTTP 401. Now every
    request to the server carries the key; a wrong one is one clear error before anything is sampled."""
    student = save_tiny_student(tmp_path / "student", seed=0)
    output = tmp_path / "out"
    sample = TrainingSample(list(range(3, 23)), [False] * 5 + [True] * 15, [0.0] * 20, 1.0)
    write_step_batch(output, 1, [[sample, sample]])
    app = build_app(student, dtype="float32", device="cpu", batch_window_s=0.0, api_key="sk-student-test")
    with serve_asgi(app) as base_url:
        cfg = rl_config(student, output, base_url)
        assert cfg.orchestrator.student_endpoint is not None
        cfg.orchestrator.student_endpoint.api_key_var = "STUDENT_KEY"
        train(cfg)

        async def before_batch_2() -> int:
            sync = PolicySync(cfg)
            try:
                await sync.wait_ready()
                await sync.wait(2)
                return sync.policy_step()
            finally:
                await sync.aclose()

        monkeypatch.setenv("STUDENT_KEY", "sk-wrong")
        with pytest.raises(ApprenticeError, match=r"refused the credentials \(HTTP 401\).*student_endpoint.api_key_var"):
            asyncio.run(before_batch_2())
        monkeypatch.setenv("STUDENT_KEY", "sk-student-test")
        assert asyncio.run(before_batch_2()) == 1
        assert app.state.engine.weights["step"] == 1
