"""`trainer.weight_broadcast = "collective"` with the vllm backend: the trainer's WeightSender, the orchestrator's
VLLMBackend.staged/apply and apprentice's vLLM worker extension (inference/vllm_worker.py) over a real gloo group
and real HTTP on loopback.

vLLM itself cannot run here (no GPU, and its wheels pull a CUDA torch), so a small stand-in plays its part: the
dev-mode POST /collective_rpc that runs a method on every worker at once and answers {"results": [...]} (as
vLLM's router writes them; HTTP 500 when a worker raises), POST /reset_prefix_cache, and workers whose `model_runner.model.load_weights` takes
(Hugging Face name, tensor) pairs as vLLM's model classes do. Two workers stand for tensor parallelism: each
receives every tensor. What this cannot show (NCCL, vLLM's own loaders and scheduler) is left to
tests/integration/test_rl_vllm.py on a GPU machine.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fault_teacher import serve_asgi
from test_weight_broadcast import trained

from apprentice import collective
from apprentice.handoff.hfdir import full_state_dict
from apprentice.inference.backends import VLLMBackend, WeightReloadError
from apprentice.inference.vllm_worker import WeightReloader
from apprentice.loader import load_causal_lm
from apprentice.testing.tiny import save_tiny_student
from apprentice.trainer.broadcast import WeightSender


class StandInModel:
    """vLLM's side of `load_weights`: (HF name, tensor) pairs copied into the running parameters in place."""

    def __init__(self, student: Path) -> None:
        self.model = load_causal_lm(student, dtype=torch.float32, device="cpu")
        self.calls = 0

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        self.calls += 1
        params = dict(self.model.state_dict())
        loaded = set()
        with torch.no_grad():
            for name, tensor in weights:
                params[name].copy_(tensor)  # an unknown name raises, as vLLM's loaders do
                loaded.add(name)
        return loaded


class StandInWorker(WeightReloader):
    def __init__(self, rank: int, student: Path) -> None:
        self.rank = rank
        self.model_runner = type("ModelRunner", (), {"model": StandInModel(student)})()


def stand_in_vllm(workers: list[StandInWorker]) -> tuple[FastAPI, dict[str, int]]:
    app, counts = FastAPI(), {"reset_prefix_cache": 0}

    @app.post("/collective_rpc")
    async def collective_rpc(request: Request) -> JSONResponse:
        body = await request.json()
        results: list[Any] = [None] * len(workers)
        errors: list[BaseException] = []

        def run(i: int) -> None:
            try:
                results[i] = getattr(workers[i], body["method"])(*body.get("args", []))
            except Exception as e:
                errors.append(e)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(workers))]
        await asyncio.to_thread(lambda: [t.start() for t in threads] and [t.join() for t in threads])
        if errors:
            return JSONResponse({"error": f"{type(errors[0]).__name__}: {errors[0]}"}, status_code=500)
        # vLLM passes None, dicts and lists through and answers str() of anything else (an int comes back "3").
        return JSONResponse({"results": [r if r is None or isinstance(r, dict | list) else str(r) for r in results]})

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache() -> JSONResponse:
        counts["reset_prefix_cache"] += 1
        return JSONResponse({})

    return app, counts


@contextmanager
def vllm_server(student: Path, n_workers: int) -> Iterator[tuple[str, list[StandInWorker], dict[str, int]]]:
    workers = [StandInWorker(rank, student) for rank in range(n_workers)]
    app, counts = stand_in_vllm(workers)
    with serve_asgi(app) as base_url:
        yield base_url, workers, counts


def staged(base_url: str) -> int | None:
    async def ask() -> int | None:
        async with httpx.AsyncClient(timeout=30.0) as http:
            return await VLLMBackend().staged(http, base_url)

    return asyncio.run(ask())


def apply(base_url: str, step: int) -> int:
    async def go() -> int:
        async with httpx.AsyncClient(timeout=30.0) as http:
            return (await VLLMBackend().apply(http, base_url, step))[1]

    return asyncio.run(go())


def holds(worker: StandInWorker, state: dict[str, torch.Tensor]) -> bool:
    served = worker.model_runner.model.model.state_dict()
    return all(torch.equal(served[name], tensor) for name, tensor in state.items())


def test_a_collective_update_reaches_every_vllm_worker_exactly_and_only_when_applied(tmp_path: Path) -> None:
    student = save_tiny_student(tmp_path / "student", seed=0)
    model = trained(student)
    initial = full_state_dict(load_causal_lm(student, dtype=torch.float32, device="cpu"))
    with vllm_server(student, n_workers=2) as (base_url, workers, counts):
        sender = WeightSender(base_url, timeout_s=30.0, server="vllm")
        try:
            assert staged(base_url) is None
            sender.send(full_state_dict(model), step=1)
            assert staged(base_url) == 1
            assert all(holds(w, initial) for w in workers)  # staged in host memory, not served until applied
            assert apply(base_url, 1) == 1
            assert all(holds(w, full_state_dict(model)) for w in workers)  # bit-exact on every worker
            assert counts["reset_prefix_cache"] == 1  # no KV block of the old weights is reused
            assert staged(base_url) is None
            # Steps 2 and 3 arrive before the orchestrator applies 2: it serves the newer one and says so.
            sender.send(full_state_dict(model), step=2)
            with torch.no_grad():
                model.lm_head.weight.mul_(0.5)
            sender.send(full_state_dict(model), step=3)
            assert apply(base_url, 2) == 3
            assert all(holds(w, full_state_dict(model)) for w in workers)
            with pytest.raises(WeightReloadError, match="no complete update of step 4"):
                apply(base_url, 4)
        finally:
            sender.close()


def test_a_partial_update_to_vllm_never_loads_and_the_next_one_rejoins(tmp_path: Path) -> None:
    student = save_tiny_student(tmp_path / "student", seed=0)
    model = trained(student)
    state = full_state_dict(model)
    initial = full_state_dict(load_causal_lm(student, dtype=torch.float32, device="cpu"))
    with vllm_server(student, n_workers=2) as (base_url, workers, _):
        # A trainer that dies halfway: the workers are receiving, half the tensors arrive, then the group goes.
        sender = WeightSender(base_url, timeout_s=5.0, server="vllm")
        tensors = list(state.items())
        receiving = sender._begin_vllm(collective.manifest(tensors), step=1)
        assert sender.group is not None
        for _, tensor in tensors[: len(tensors) // 2]:
            collective.broadcast(sender.group, tensor.contiguous())
        sender.group = None
        receiving.join(60.0)
        assert receiving.error is not None and "HTTP 500" in receiving.error
        assert staged(base_url) is None
        with pytest.raises(WeightReloadError, match="no complete update of step 1"):
            apply(base_url, 1)
        assert all(w.model_runner.model.calls == 0 and holds(w, initial) for w in workers)  # never touched

        # The trainer comes back: the workers report no group, it joins again and the update arrives whole.
        sender.send(state, step=2)
        assert apply(base_url, 2) == 2
        assert all(holds(w, state) for w in workers)
        sender.close()


def test_a_vllm_that_never_answers_an_apply_times_out_on_the_clients_timeout(tmp_path: Path) -> None:
    """The orchestrator's client timeout bounds every collective_rpc: a hung vLLM is an error, not a hang."""
    student = save_tiny_student(tmp_path / "student", seed=0)
    with vllm_server(student, n_workers=1) as (base_url, workers, _):
        release = threading.Event()
        workers[0].apprentice_apply = lambda step: release.wait(30.0)  # type: ignore[method-assign]

        async def go() -> None:
            async with httpx.AsyncClient(timeout=1.0) as http:
                await asyncio.wait_for(VLLMBackend().apply(http, base_url, 1), timeout=20.0)

        try:
            with pytest.raises(httpx.ReadTimeout):
                asyncio.run(go())
        finally:
            release.set()
