"""Damaged or awkward stored state against the real trainer and orchestrator (tiny student, files damaged by the
test): a corrupt checkpoint falls back and retrains, a batch the trainer cannot pack never wedges a rerun, the
orchestrator never writes such a sample, and every file keeps the standard mode across a resume."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from fault_teacher import FaultTeacher, reverse_last_user
from safetensors.torch import load_file

from apprentice import fsio
from apprentice.config import Config
from apprentice.handoff.rollouts import latest_step_batch, read_step_batch, write_step_batch
from apprentice.metrics import read_metrics
from apprentice.orchestrator.loop import run as run_orchestrator
from apprentice.testing.tiny import save_tiny_student
from apprentice.trainer import ckpt
from apprentice.trainer.train import main as train
from apprentice.types import TrainingSample


@pytest.fixture(scope="module")
def student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_student(tmp_path_factory.mktemp("student"))


def samples(step: int, n: int = 4, lengths: tuple[int, int] = (6, 40)) -> list[TrainingSample]:
    rng = random.Random(step)
    out = []
    for _ in range(n):
        t = rng.randint(*lengths)
        out.append(TrainingSample([rng.randrange(3, 60) for _ in range(t)], [i >= t // 3 for i in range(t)], [0.0] * t, 1.0))
    return out


def trainer_config(student: Path, output: Path, max_steps: int, **trainer: Any) -> Config:
    base = {"max_steps": max_steps, "micro_batch_tokens": 64, "loss": {"type": "sft"}, "optim": {"lr": 3e-3},
            "ckpt": {"interval": 1, "keep": 3}, "batch_timeout_s": 30.0}  # fmt: skip
    return Config.model_validate({
        "model": {"name": str(student)}, "output_dir": str(output), "inference": {},
        "trainer": {**base, **trainer}, "log": {"progress": False},
    })  # fmt: skip


def final_weights(output: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output / "final" / "model.safetensors"))


def assert_standard_modes(output: Path) -> None:
    wrong = []
    for path in [output, *output.rglob("*")]:
        want = (fsio.DIR_MODE if path.is_dir() else fsio.FILE_MODE) & ~fsio._umask()
        if os.stat(path).st_mode & 0o777 != want:
            wrong.append(f"{path.relative_to(output)}: {oct(os.stat(path).st_mode & 0o777)}")
    assert not wrong, f"want files {oct(fsio.FILE_MODE & ~fsio._umask())}, dirs {oct(fsio.DIR_MODE & ~fsio._umask())}: {wrong}"


def test_corrupt_checkpoint_falls_back_retrains_from_stored_batches_and_keeps_modes(
    student: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ref, run = tmp_path / "ref", tmp_path / "run"
    for out in (ref, run):
        for step in range(1, 4):
            write_step_batch(out, step, [samples(step)])
    train(trainer_config(student, ref, 3))
    train(trainer_config(student, run, 2))
    assert_standard_modes(run)  # checkpoints, metrics, progress, final/, rollouts: one file mode, one dir mode

    # The probe of the issue: 4 KB overwritten inside the newest checkpoint's shard (it used to load silently).
    (shard,) = (run / "checkpoints" / "step_2" / "state").glob("*.distcp")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4096] = os.urandom(4096)
    shard.write_bytes(bytes(data))

    with caplog.at_level(logging.WARNING, logger="apprentice.trainer"):
        train(trainer_config(student, run, 3))
    assert str(shard) in caplog.text and "step_2.corrupt" in caplog.text
    # Step 2 was retrained from its stored batch, then step 3: the result is the uninterrupted run's, exactly.
    assert [r["step"] for r in read_metrics(run / "trainer" / "metrics.jsonl")] == [1, 2, 3]
    a, b = final_weights(ref), final_weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [s for s, _ in ckpt.complete_checkpoints(run)] == [1, 2, 3]
    assert_standard_modes(run)  # ... still, after the resume rewrote metrics, checkpoints and final/


def test_a_stored_batch_the_trainer_cannot_pack_is_skipped_with_a_count_not_fatal(
    student: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "run"
    # Step 1 was stored under a larger micro-batch limit (or by an older version): two samples exceed 64 tokens.
    write_step_batch(out, 1, [samples(1) + [samples(9, n=1, lengths=(100, 100))[0], samples(8, n=1, lengths=(65, 65))[0]]])
    write_step_batch(out, 2, [samples(2)])
    with caplog.at_level(logging.WARNING, logger="apprentice.trainer"):
        train(trainer_config(student, out, 2))
    rows = read_metrics(out / "trainer" / "metrics.jsonl")
    assert [r["loss/skipped_samples"] for r in rows] == [2, 0]
    assert "rollouts/step_1/rank_0.safetensors: skipped 2 sample(s)" in caplog.text
    assert rows[0]["loss/tokens"] > 0  # the packable samples of the step were still trained


def test_the_orchestrator_never_writes_a_sample_longer_than_a_micro_batch(student: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEACHER_KEY", "sk-stored-state-test-7c2e")

    def respond(body: dict[str, Any]) -> str:
        text = reverse_last_user(body)
        # Some answers are long (within max_tokens): their samples exceed micro_batch_tokens and must be set aside.
        return text * 12 if int(hashlib.sha256(text.encode()).hexdigest(), 16) % 3 == 0 else text

    output = tmp_path / "out"
    with FaultTeacher(api_key="sk-stored-state-test-7c2e", respond=respond) as teacher:
        cfg = Config.model_validate({
            "output_dir": str(output), "model": {"name": str(student)},
            "orchestrator": {
                "batch_size": 6, "use_token_client": False, "max_async_level": 100,
                "rollout_model": {"base_url": teacher.base_url, "model": "teacher", "api_key_var": "TEACHER_KEY"},
                "sampling": {"max_tokens": 1024}, "env": [{"id": "reverse-text", "args": {"num_tasks": 40}}],
            },
            "trainer": {"max_steps": 3, "micro_batch_tokens": 96, "loss": {"type": "sft"}}, "log": {"progress": False},
        })  # fmt: skip
        asyncio.run(run_orchestrator(cfg))
    assert latest_step_batch(output) == 3
    stored = [s for step in (1, 2, 3) for s in read_step_batch(output, step, 0)]
    rows = read_metrics(output / "orchestrator" / "metrics.jsonl")
    too_long = sum(r["render/set_aside/too_long"] for r in rows)
    assert stored and all(0 < len(s) <= 96 for s in stored)
    assert too_long > 0 and too_long + len(stored) == sum(r["render/samples"] for r in rows)


def test_a_damaged_teacher_cache_entry_is_paid_again_and_replaced_not_a_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from apprentice.clients.openai_client import OpenAIChatClient
    from apprentice.config import EndpointConfig, SamplingConfig

    monkeypatch.setenv("TEACHER_KEY", "sk-stored-state-test-7c2e")
    messages = [{"role": "user", "content": "hello world"}]

    def ask(base_url: str) -> str:
        async def go() -> str:
            endpoint = EndpointConfig(base_url=base_url, model="teacher", api_key_var="TEACHER_KEY", max_retries=0)
            client = OpenAIChatClient(endpoint, SamplingConfig(max_tokens=32), max_concurrency=1, use_token_client=False, cache_dir=tmp_path / "cache")
            try:
                return str((await client.chat(messages, key="step1/task0")).message["content"])
            finally:
                await client.aclose()

        return asyncio.run(go())

    with FaultTeacher(api_key="sk-stored-state-test-7c2e", respond=reverse_last_user) as teacher:
        assert ask(teacher.base_url) == "dlrow olleh"
        (entry,) = (tmp_path / "cache").rglob("*.json")
        good = entry.read_bytes()
        for damaged in (good[: len(good) // 2], b"[]", good.replace(b'"finish_reason"', b'"finish_reasons"')):
            entry.write_bytes(damaged)
            before = len(teacher.chat_requests())
            assert ask(teacher.base_url) == "dlrow olleh"
            assert len(teacher.chat_requests()) == before + 1  # a miss: asked again
            assert entry.read_bytes() == good  # and the fresh answer replaced the damaged entry
        assert ask(teacher.base_url) == "dlrow olleh" and len(teacher.chat_requests()) == 4  # a hit again
