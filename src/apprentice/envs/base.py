"""The Environment interface the orchestrator runs. Built-ins and user environments implement it.

A rollout returns a `apprentice.trajectory.Trajectory` (a typed dict, DESIGN.md section 4; built by
`envs.trajectory`):
    {"steps": [{"prompt": [...], "completion": [...], "tokens": {...}}, ...],
     "tools": [...] or None, "reward": float, "metrics": {name: float}, "error": str | None,
     "task_id": str, "env": str, "truncated": bool}
Each step's prompt is the whole conversation before that turn, so step k+1's prompt extends step k's
prompt + completion (+ tool/user messages). `tokens` (the server's ids and logprobs) is what `make_step` adds from
the client's response with the token client; rl mode sets aside a rollout with a step without it ("no_tokens"),
distill mode renders the messages. Metric names are bare ("num_turns"); the orchestrator prefixes them with
`rollout/{env}/`; a metric that is not a finite number is counted (`rollout/{env}/{name}/not_a_number`), not
averaged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from apprentice.clients.base import ChatClient
from apprentice.errors import UsageError
from apprentice.trajectory import Trajectory

Split = Literal["train", "eval"]


class EnvError(UsageError, ValueError):
    """An environment that cannot be built: unknown id, bad args, unreadable dataset. The message names the
    environment, file or argument at fault and says how to fix it."""


@dataclass
class Task:
    """One prompt of an environment's dataset."""

    id: str
    """Stable identifier (used in cache keys and resumable ordering)."""
    prompt: list[dict[str, Any]]
    """The opening chat messages (system/user)."""
    answer: Any = None
    """Reference answer for the reward function, if any."""
    info: dict[str, Any] = field(default_factory=dict)
    """Anything else the environment needs at scoring time."""


class Environment(Protocol):
    name: str
    """Short name used in metric names (`rollout/{name}/reward`)."""
    tools: list[dict[str, Any]] | None
    """OpenAI tool schemas offered to the model, or None."""

    def tasks(self, split: Split) -> list[Task]:
        """All tasks of a split, in a fixed order (the orchestrator samples from them with its own seed)."""
        ...

    async def rollout(self, task: Task, client: ChatClient, key: str) -> Trajectory:
        """Run one episode with `client` and return its scored trajectory. `key` prefixes the client keys.

        Client failures (`ClientError`) propagate: the orchestrator counts and drops the rollout.
        """
        ...
