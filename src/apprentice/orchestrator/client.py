"""The rollout client of a run: the teacher endpoint (distill mode) or the student's server (rl mode)."""

from __future__ import annotations

from pathlib import Path

from apprentice.clients.openai_client import OpenAIChatClient
from apprentice.config import Config, EndpointConfig


def rollout_endpoint(cfg: Config) -> EndpointConfig:
    orch = cfg.orchestrator
    if orch.rollout_model is not None:
        return orch.rollout_model
    if orch.student_endpoint is not None:
        return orch.student_endpoint
    assert cfg.inference is not None  # guaranteed by the config's mode rules
    return EndpointConfig(base_url=f"http://{cfg.inference.host}:{cfg.inference.port}/v1", model=cfg.model.name)


def build_client(cfg: Config) -> OpenAIChatClient:
    orch = cfg.orchestrator
    # Only teacher responses are cached: they cost money and are off-policy by nature. rl-mode samples must
    # come from the current policy, so a cache would replay stale rollouts.
    cache_dir = Path(cfg.output_dir) / "teacher_cache" if cfg.mode == "distill" else None
    return OpenAIChatClient(
        rollout_endpoint(cfg),
        orch.sampling,
        max_concurrency=orch.max_concurrency,
        use_token_client=orch.use_token_client,
        cache_dir=cache_dir,
    )
