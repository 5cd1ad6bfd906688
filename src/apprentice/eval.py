"""`apprentice eval CONFIG.toml --model DIR_OR_URL`: mean reward on the held-out tasks of each environment.

A directory is served for the occasion with `apprentice serve`; a URL is used as an OpenAI-compatible endpoint
(its API key variable is taken from [orchestrator.rollout_model] when the base URL matches).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from apprentice.clients.base import ChatClient, ClientError
from apprentice.clients.openai_client import OpenAIChatClient
from apprentice.config import Config, ConfigError, EndpointConfig
from apprentice.envs.base import Environment, Task
from apprentice.envs.registry import load_environment
from apprentice.envs.reward_check import RewardError, checked_reward
from apprentice.errors import UsageError
from apprentice.inference.launch import local_server


class ModelPathError(UsageError, FileNotFoundError):
    """`--model` names neither a URL nor a directory."""


@dataclass
class EnvResult:
    env: str
    tasks: int
    reward: float
    failed: int


def served_model_name(base_url: str, api_key: str | None = None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(f"{base_url}/models", headers=headers, timeout=30.0)
    response.raise_for_status()
    return str(response.json()["data"][0]["id"])


@contextlib.contextmanager
def endpoint_for(cfg: Config, model: str, server_args: list[str] | None = None) -> Iterator[EndpointConfig]:
    """An endpoint for `model`: a URL as is, or a local directory served on loopback for the block."""
    if model.startswith(("http://", "https://")):
        teacher = cfg.orchestrator.rollout_model
        if teacher is not None and teacher.base_url == model.rstrip("/"):
            yield teacher
            return
        yield EndpointConfig(base_url=model, model=served_model_name(model.rstrip("/")))
        return
    if not Path(model).exists():
        raise ModelPathError(f"--model {model!r} is neither an http(s) URL nor an existing directory: pass a model directory (e.g. OUTPUT/final) or an OpenAI-compatible base URL")
    with local_server(model, extra_args=server_args, log_path=Path(cfg.output_dir) / "eval_server.log") as base_url:
        yield EndpointConfig(base_url=base_url, model=served_model_name(base_url))


async def evaluate_endpoint(cfg: Config, endpoint: EndpointConfig, num_tasks: int | None = None) -> list[EnvResult]:
    """Roll out every environment's eval tasks once against `endpoint` and average the rewards."""
    client = OpenAIChatClient(endpoint, cfg.orchestrator.sampling, max_concurrency=cfg.orchestrator.max_concurrency, use_token_client=False, cache_dir=None)
    results = []
    try:
        for env_cfg in cfg.orchestrator.env:
            env = load_environment(env_cfg, seed=cfg.seed)
            tasks = env.tasks("eval")[:num_tasks]
            if not tasks:
                raise ConfigError(f"environment {env.name!r} has no eval tasks; give it eval tasks (see its args) to evaluate")
            outcomes = await asyncio.gather(*(_safe_rollout(env, task, client, i) for i, task in enumerate(tasks)))
            rewards = [r for r in outcomes if r is not None]
            results.append(EnvResult(env.name, len(tasks), sum(rewards) / len(tasks), len(tasks) - len(rewards)))
    finally:
        await client.aclose()
    return results


async def _safe_rollout(env: Environment, task: Task, client: ChatClient, index: int) -> float | None:
    try:
        trajectory = await env.rollout(task, client, f"eval/{env.name}/{task.id}/{index}")
        return checked_reward(trajectory.get("reward", 0.0), f"the reward of environment {env.name!r}")
    except (ClientError, RewardError):  # a failed request, a reward function that raised or returned NaN / a string
        return None  # counted as failed, scored 0


def evaluate(cfg: Config, model: str, num_tasks: int | None = None, server_args: list[str] | None = None) -> list[EnvResult]:
    with endpoint_for(cfg, model, server_args) as endpoint:
        return asyncio.run(evaluate_endpoint(cfg, endpoint, num_tasks))


def format_table(rows: list[EnvResult]) -> str:
    lines = [f"{'environment':<24} {'tasks':>6} {'failed':>6} {'reward':>8}"]
    lines += [f"{r.env:<24} {r.tasks:>6} {r.failed:>6} {r.reward:>8.3f}" for r in rows]
    return "\n".join(lines)


def main(cfg: Config, model: str, num_tasks: int | None = None) -> int:
    print(format_table(evaluate(cfg, model, num_tasks)))
    return 0
