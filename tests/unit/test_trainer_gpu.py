"""The GPU benchmark runs (a CPU smoke run here), and GPU-only checks of the trainer (skipped without CUDA)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from apprentice.config import ModelConfig
from apprentice.testing.tiny import save_tiny_student
from apprentice.trainer.model import load_model
from apprentice.trainer.packing import pack_samples
from apprentice.types import TrainingSample

REPO = Path(__file__).resolve().parents[2]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_gpu_sft_bench_tiny_runs_on_cpu() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "bench/gpu_sft.py", "--tiny", "--device", "cpu", "--steps", "2", "--warmup", "1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "tokens/s per rank:" in proc.stdout and "MFU:" in proc.stdout
    assert "precision bf16-mixed" in proc.stdout


@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed")
def test_flash_attn_varlen_equals_per_sample_sdpa(tmp_path: Path) -> None:
    student = save_tiny_student(tmp_path / "student")
    samples = [TrainingSample(list(range(3, 3 + n)), [True] * n, [0.0] * n, 1.0) for n in (7, 33, 100, 5)]
    (mb,) = pack_samples(samples, 256)
    mb = mb.to(torch.device("cuda"))
    logits = {}
    for attn in ("flash_attention_2", "apprentice_varlen"):
        cfg = ModelConfig(name=str(student), attn_implementation=attn)
        model = load_model(cfg, torch.device("cuda"), torch.bfloat16)
        with torch.no_grad():
            logits[attn] = model(**mb.model_kwargs()).logits.float()
    torch.testing.assert_close(logits["flash_attention_2"], logits["apprentice_varlen"], rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@needs_cuda
def test_gpu_sft_bench_runs_on_cuda() -> None:
    proc = subprocess.run([sys.executable, "bench/gpu_sft.py", "--tiny", "--device", "cuda", "--steps", "2", "--warmup", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed")
def test_train_step_host_syncs_do_not_grow_with_micro_batches(tmp_path: Path) -> None:
    """CUDA's sync debug mode counts host synchronisations: a step of 4 micro-batches has as many as a step of 1.

    flash-attn reads the packed boundaries on the device; the CPU fallback attention (apprentice_varlen) reads
    them on the host, once per layer, which is why GPU runs want flash-attn installed.
    """
    import warnings

    from apprentice.config import Config
    from apprentice.trainer.losses import build_loss
    from apprentice.trainer.parallelize import parallelize
    from apprentice.trainer.precision import PRECISIONS
    from apprentice.trainer.train import train_step
    from apprentice.trainer.world import World

    student = save_tiny_student(tmp_path / "student")
    cfg = Config.model_validate({"model": {"name": str(student), "attn_implementation": "flash_attention_2"},
                                 "output_dir": str(tmp_path), "inference": {}, "trainer": {"loss": {"type": "sft"}}})  # fmt: skip
    device = torch.device("cuda")
    model = parallelize(load_model(cfg.model, device), cfg, None, PRECISIONS["fp32"])
    params = list(model.parameters())
    samples = [TrainingSample(list(range(3, 3 + n)), [True] * n, [0.0] * n, 1.0) for n in (30, 40, 50, 60)]

    def syncs(micro_batch_tokens: int) -> int:
        def step() -> None:
            train_step(model, samples, build_loss(cfg.trainer.loss), params, World(), device,
                       micro_batch_tokens=micro_batch_tokens, grad_clip=1.0, logprob_chunk_tokens=16)  # fmt: skip

        step()  # warmup: lazy initialisations may synchronise
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    assert syncs(64) == syncs(256)  # 4 micro-batches vs 1
