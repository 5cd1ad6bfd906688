"""The vllm backend on a GPU machine: `vllm serve` with apprentice's worker extension, weights reloaded in place.

Skipped here (no CUDA, no vLLM); run with `pytest -m gpu` where both exist.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch

from apprentice.config import load_config
from apprentice.handoff.weights import publish, weights_dir
from apprentice.inference.backends import VLLMBackend
from apprentice.inference.launch import free_port
from apprentice.testing import smollm2

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None,
                       reason="needs a CUDA device and the vllm extra"),  # fmt: skip
]


def _answer(base_url: str) -> tuple[list[int], list[float]]:
    body = {"model": "student", "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 16, "temperature": 0.0, "logprobs": True, "return_token_ids": True}  # fmt: skip
    choice = httpx.post(f"{base_url}/chat/completions", json=body, timeout=120).json()["choices"][0]
    return choice["token_ids"], [c["logprob"] for c in choice["logprobs"]["content"]]


@contextmanager
def _vllm(tmp_path: Path, model_dir: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    config = tmp_path / "rl.toml"
    config.write_text(f'output_dir = "{tmp_path / "out"}"\n[model]\nname = "student"\n[orchestrator]\nrollouts_per_prompt = 2\n'
                      f'[inference]\nbackend = "vllm"\nport = {port}\ngpu_memory_utilization = 0.3\n')  # fmt: skip
    cfg = load_config([config])
    backend = VLLMBackend()
    server = subprocess.Popen(backend.command(cfg, model_dir), env={**os.environ, **backend.env()})
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 600
        while True:
            assert server.poll() is None, "vllm serve exited"
            try:
                if httpx.get(f"{base_url}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline
            time.sleep(2)
        yield base_url, server
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_vllm_takes_a_collective_update_in_place(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from apprentice.handoff.hfdir import full_state_dict
    from apprentice.trainer.broadcast import WeightSender

    model_dir = smollm2.export_smollm2(tmp_path / "smollm2")
    with _vllm(tmp_path, model_dir) as (base_url, server):
        ids, _ = _answer(base_url)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        with torch.no_grad():
            model.lm_head.weight.mul_(-1.0)
        sender = WeightSender(base_url, timeout_s=300.0, server="vllm")
        sender.send(full_state_dict(model), step=1)
        assert _answer(base_url)[0] == ids  # staged, not served

        async def apply() -> int:
            async with httpx.AsyncClient(timeout=600) as http:
                return (await VLLMBackend().apply(http, base_url, 1))[1]

        assert asyncio.run(apply()) == 1
        assert _answer(base_url)[0] != ids
        assert server.poll() is None
        sender.close()


def test_vllm_reloads_published_weights_without_restart(tmp_path: Path) -> None:
    model_dir = smollm2.export_smollm2(tmp_path / "smollm2")
    with _vllm(tmp_path, model_dir) as (base_url, server):
        ids, logprobs = _answer(base_url)
        assert logprobs and all(lp <= 0.0 for lp in logprobs)

        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(model_dir)
        with torch.no_grad():
            model.lm_head.weight.mul_(-1.0)  # the least likely token becomes the greedy choice
        publish(model, AutoTokenizer.from_pretrained(model_dir), tmp_path / "out", 1, keep=2)

        async def reload() -> None:
            async with httpx.AsyncClient(timeout=600) as http:
                await VLLMBackend().reload(http, base_url, weights_dir(tmp_path / "out", 1), 1)

        asyncio.run(reload())
        assert _answer(base_url)[0] != ids
        assert server.poll() is None  # reloaded in place, never restarted
