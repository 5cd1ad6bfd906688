"""`apprentice eval CONFIG.toml --model DIR_OR_URL`: mean reward on the held-out tasks of each environment.

A directory is served for the occasion with `apprentice serve`; a URL is used as an OpenAI-compatible endpoint
(with the API key variable and headers of the config's endpoint of that base URL: rollout_model, student_endpoint
or teacher_model). The evaluation samples as rl mode's held-out evaluation does, whatever the mode: at
`orchestrator.eval_temperature` (0, greedy, by default) over `orchestrator.eval_num_tasks` tasks per environment
(`--num-tasks` overrides it), so a score of OUTPUT/final matches the last line of eval.jsonl.
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


def served_model_name(base_url: str) -> str:
    """The first model id `base_url`/models lists; a UsageError naming the URL when it cannot say."""
    try:
        response = httpx.get(f"{base_url}/models", timeout=30.0)
        response.raise_for_status()
        return str(response.json()["data"][0]["id"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
        raise UsageError(f"--model {base_url}: could not read the served model's name from {base_url}/models "
                         f"({type(e).__name__}: {e}); is the server up at that URL?") from None  # fmt: skip


@contextlib.contextmanager
def endpoint_for(cfg: Config, model: str, server_args: list[str] | None = None) -> Iterator[EndpointConfig]:
    """An endpoint for `model`: a URL as is, or a local directory served on loopback for the block."""
    if model.startswith(("http://", "https://")):
        orch = cfg.orchestrator
        known = [e for e in (orch.rollout_model, orch.student_endpoint, orch.teacher_model) if e is not None]
        match = next((e for e in known if e.base_url == model.rstrip("/")), None)
        if match is not None:  # its model name, key and headers
            yield EndpointConfig.model_validate(match.model_dump(include=set(EndpointConfig.model_fields)))
            return
        yield EndpointConfig(base_url=model, model=served_model_name(model.rstrip("/")))
        return
    if not Path(model).exists():
        raise ModelPathError(f"--model {model!r} is neither an http(s) URL nor an existing directory: pass a model directory (e.g. OUTPUT/final) or an OpenAI-compatible base URL")
    with local_server(model, extra_args=server_args, log_path=Path(cfg.output_dir) / "eval_server.log") as base_url:
        yield EndpointConfig(base_url=base_url, model=served_model_name(base_url))


async def evaluate_endpoint(cfg: Config, endpoint: EndpointConfig, num_tasks: int | None = None) -> list[EnvResult]:
    """Roll out every environment's eval tasks once against `endpoint` (`num_tasks` per environment, default
    orchestrator.eval_num_tasks; at orchestrator.eval_temperature) and average the rewards."""
    orch = cfg.orchestrator
    sampling = orch.sampling.model_copy(update={"temperature": orch.eval_temperature})
    num_tasks = num_tasks if num_tasks is not None else orch.eval_num_tasks
    client = OpenAIChatClient(endpoint, sampling, max_concurrency=orch.max_concurrency, use_token_client=False, cache_dir=None)
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
