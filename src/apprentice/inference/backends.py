"""Inference backends of rl mode behind one small interface: how to start the server, how to reload weights.

    builtin  `apprentice serve` (CPU or GPU): POST /v1/load_weights {"path", "step"}, where the server verifies,
             loads and swaps (inference/server.py)
    vllm     `vllm serve` with apprentice's worker extension (GPU, the `vllm` extra): with
             VLLM_SERVER_DEV_MODE=1 vLLM exposes POST /collective_rpc, which calls a method on every worker;
             `apprentice.inference.vllm_worker.WeightReloader.reload(path)` verifies the published directory and
             reads its safetensors into the running model in place (no restart), then the prefix cache is reset.

With `trainer.weight_broadcast = "collective"` the trainer sends each step's weights over a torch.distributed
group instead (trainer/broadcast.py); the orchestrator then asks for the staged update (`staged`) and serves it
(`apply`): `apprentice serve` through GET /v1/weights and POST /v1/weights/apply (inference/collective.py), vLLM
through its workers' `apprentice_status` / `apprentice_apply` (inference/vllm_worker.py).

Both serve the OpenAI chat API with token ids (`return_token_ids`) and raw-model logprobs, which is all the
orchestrator's token client needs.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx

from apprentice.config import Config, InferenceConfig
from apprentice.errors import ApprenticeError


class WeightReloadError(ApprenticeError):
    """The server refused or failed to load published weights."""


class Backend(Protocol):
    def command(self, cfg: Config, model: str | Path) -> list[str]:
        """The command line that serves `model` on [inference] host:port."""
        ...

    def env(self) -> dict[str, str]:
        """Extra environment variables of the server process."""
        ...

    async def reload(self, http: httpx.AsyncClient, base_url: str, path: Path, step: int) -> float | None:
        """Make the server sample from the weights in `path` (published trainer step `step`) from now on; the
        seconds the server says the reload took, or None when it does not say."""
        ...

    async def staged(self, http: httpx.AsyncClient, base_url: str) -> int | None:
        """collective: the step of the complete update the server holds staged (None: none, or no answer)."""
        ...

    async def apply(self, http: httpx.AsyncClient, base_url: str, step: int) -> tuple[float | None, int]:
        """collective: serve the staged update of `step` or newer; (the server's seconds or None, the step served)."""
        ...


def _raise_for(response: httpx.Response, what: str) -> None:
    if response.status_code >= 400:
        raise WeightReloadError(f"{what} answered HTTP {response.status_code}: {response.text[:500]}")


@dataclass(frozen=True)
class BuiltinBackend:
    def command(self, cfg: Config, model: str | Path) -> list[str]:
        inf = _inference(cfg)
        command = [
            sys.executable, "-m", "apprentice", "serve", str(model), "--host", inf.host, "--port", str(inf.port),
            "--max-batch-size", str(inf.max_batch_size), "--dtype", inf.dtype, "--served-model-name", cfg.model.name,
        ]  # fmt: skip
        if inf.threads is not None:
            command += ["--threads", str(inf.threads)]
        if cfg.model.trust_remote_code:
            command.append("--trust-remote-code")
        if cfg.model.gguf_file and str(model) == cfg.model.name:  # published weights (a resumed run) are safetensors
            command += ["--gguf-file", cfg.model.gguf_file]
        return command + list(inf.extra_args)

    def env(self) -> dict[str, str]:
        return {}

    async def reload(self, http: httpx.AsyncClient, base_url: str, path: Path, step: int) -> float | None:
        response = await http.post(f"{base_url}/load_weights", json={"path": str(path), "step": step})
        _raise_for(response, f"{base_url}/load_weights ({path})")
        seconds = response.json().get("reload_s")
        return float(seconds) if isinstance(seconds, int | float) else None

    async def staged(self, http: httpx.AsyncClient, base_url: str) -> int | None:
        try:
            staged = (await http.get(f"{base_url}/weights", timeout=10.0)).json().get("staged")
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        return staged if isinstance(staged, int) else None

    async def apply(self, http: httpx.AsyncClient, base_url: str, step: int) -> tuple[float | None, int]:
        response = await http.post(f"{base_url}/weights/apply", json={"step": step})
        _raise_for(response, f"{base_url}/weights/apply (step {step})")
        body = response.json()
        seconds, served = body.get("reload_s"), body.get("step")
        return (float(seconds) if isinstance(seconds, int | float) else None,
                served if isinstance(served, int) and served >= step else step)  # fmt: skip


@dataclass(frozen=True)
class VLLMBackend:
    def command(self, cfg: Config, model: str | Path) -> list[str]:
        if importlib.util.find_spec("vllm") is None:
            raise ApprenticeError(
                '[inference] backend = "vllm" needs vLLM: pip install "apprentice[vllm]" on a GPU machine, '
                'or use backend = "builtin"'
            )
        inf = _inference(cfg)
        command = [
            sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(model), "--host", inf.host,
            "--port", str(inf.port), "--served-model-name", cfg.model.name, "--max-num-seqs", str(inf.max_batch_size),
            "--dtype", inf.dtype, "--gpu-memory-utilization", str(inf.gpu_memory_utilization),
            # The orchestrator's importance ratios need the model's own distribution, not the processed one.
            "--logprobs-mode", "raw_logprobs",
            "--worker-extension-cls", "apprentice.inference.vllm_worker.WeightReloader",
        ]  # fmt: skip
        if cfg.model.trust_remote_code:
            command.append("--trust-remote-code")
        return command + list(inf.extra_args)

    def env(self) -> dict[str, str]:
        return {"VLLM_SERVER_DEV_MODE": "1"}  # enables /collective_rpc and /reset_prefix_cache

    async def reload(self, http: httpx.AsyncClient, base_url: str, path: Path, step: int) -> float | None:
        await collective_rpc(http, base_url, "reload", [str(path)])
        await _reset_prefix_cache(http, base_url)
        return None  # vLLM does not report it; the orchestrator times the requests instead

    async def staged(self, http: httpx.AsyncClient, base_url: str) -> int | None:
        try:
            results = await collective_rpc(http, base_url, "apprentice_status", [], timeout=10.0)
        except (httpx.HTTPError, WeightReloadError):
            return None
        steps = [r["staged"] for r in results if isinstance(r, dict) and isinstance(r.get("staged"), int)]
        # Every worker holds its shard of the same update, or none is servable.
        return min(steps) if len(steps) == len(results) else None

    async def apply(self, http: httpx.AsyncClient, base_url: str, step: int) -> tuple[float | None, int]:
        results = await collective_rpc(http, base_url, "apprentice_apply", [step])
        served = {int(r) for r in results}
        if len(served) != 1:  # the workers staged different updates: never serve a mix (the trainer sends anew)
            raise WeightReloadError(f"vLLM's workers applied different updates {sorted(served)} for step {step}")
        await _reset_prefix_cache(http, base_url)
        return None, served.pop()


async def collective_rpc(http: httpx.AsyncClient, base_url: str, method: str, args: list[Any],
                         timeout: float | None = None) -> list[Any]:  # fmt: skip
    """vLLM's dev-mode POST /collective_rpc: `method` of apprentice's worker extension on every worker; each
    worker's result, in worker order. `timeout`: seconds (None: the client's own timeout, never none at all)."""
    root = base_url.removesuffix("/v1")
    body = {"method": method, "args": args}
    url = f"{root}/collective_rpc"
    response = await (http.post(url, json=body) if timeout is None else http.post(url, json=body, timeout=timeout))
    _raise_for(response, f"{root}/collective_rpc {method}{tuple(args)}")
    results = response.json().get("results") if response.content else None
    if not isinstance(results, list) or not results:
        raise WeightReloadError(f"{root}/collective_rpc {method} answered no worker results: {response.text[:200]}")
    return results


async def _reset_prefix_cache(http: httpx.AsyncClient, base_url: str) -> None:
    """Cached KV blocks were computed by the old weights; a prefix hit would silently mix two policies."""
    root = base_url.removesuffix("/v1")
    _raise_for(await http.post(f"{root}/reset_prefix_cache"), f"{root}/reset_prefix_cache")


BACKENDS: dict[str, Backend] = {"builtin": BuiltinBackend(), "vllm": VLLMBackend()}


def _inference(cfg: Config) -> InferenceConfig:
    assert cfg.inference is not None, "only called when [inference] is set"
    return cfg.inference


def backend_for(cfg: Config) -> Backend:
    """The backend that serves (or, with a student endpoint, is assumed to serve) the student."""
    return BACKENDS[cfg.inference.backend if cfg.inference is not None else "builtin"]
