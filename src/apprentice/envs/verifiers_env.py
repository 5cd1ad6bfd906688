"""`verifiers` (0.4, `verifiers.v1`) tasksets as apprentice environments (optional: `pip install 'apprentice[verifiers]'`).

What runs: the taskset's own data (`Taskset.load()`, with its system prompt) and its own scoring (`Task.score`:
`@vf.reward` / `@vf.metric` methods and config-plugged functions), over a conversation sampled through
apprentice's `ChatClient` (so the teacher cache, retries, rate limit and `teacher/` metrics all apply).

What does not: verifiers' harnesses. A verifiers rollout launches the harness as a separate program (a PEP 723
script that `uv` installs from the package index at run time) talking to the provider through verifiers' own
HTTP client configured by base_url; it cannot use our client and breaks the no-download rule. This adapter plays
the part of verifiers' tool-less `null` chat harness itself: one model turn on the task's prompt. Tasksets that
need more (containers, MCP tool servers, a runtime at scoring time, LLM judges) are refused with a clear error.

    [[orchestrator.env]]
    id = "verifiers"
    args = { taskset = "my_taskset", num_eval = 20 }
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from apprentice.clients.base import ChatClient
from apprentice.envs.base import EnvError, Split, Task
from apprentice.envs.reward_check import reward_function
from apprentice.envs.trajectory import assistant_message, make_step, make_trajectory
from apprentice.trajectory import Trajectory

if TYPE_CHECKING:
    import verifiers.v1 as vf

_INSTALL_HINT = "install the optional extra: pip install 'apprentice[verifiers]'"


class VerifiersArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    taskset: str = Field(min_length=1)
    """verifiers taskset id: an installed taskset package or module exporting its `vf.Taskset` subclass in
    `__all__` (the same id `vf-eval`'s `--env.taskset.id` takes)."""
    config: dict[str, Any] = Field(default_factory=dict)
    """Fields of the taskset's own config class (`TasksetConfig` subclass), validated by verifiers."""
    limit: int | None = Field(None, ge=1)
    """Use only the first `limit` tasks (required for an infinite taskset)."""
    num_eval: int = Field(0, ge=0)
    """The last `num_eval` tasks form the eval split; the rest are the train split."""


def _import_verifiers() -> Any:
    try:
        import verifiers.v1 as vf_module
    except ImportError as e:
        raise EnvError(f"environment 'verifiers' needs the verifiers package ({e}); {_INSTALL_HINT}") from e
    return vf_module


def _requires_runtime(fn: Any) -> bool:
    """Mirrors verifiers' rule (task.py `Task.score`): a `runtime` parameter without a default needs a sandbox."""
    param = inspect.signature(fn).parameters.get("runtime")
    return param is not None and param.default is inspect.Parameter.empty


def _unsupported(taskset: Any, first: Any) -> list[str]:
    """Why this taskset cannot run without a verifiers harness (empty when it can)."""
    task_cls = type(taskset).task_type()
    problems = []
    if task_cls.NEEDS_CONTAINER:
        problems.append(f"its task type {task_cls.__name__} needs a container")
    if taskset.toolsets(taskset.config) or task_cls.toolsets(taskset.config.task):
        problems.append("it serves tools through MCP toolsets")
    if first.config.judges:
        problems.append("it scores with LLM judges")
    needs_runtime = [fn.__name__ for kind in ("reward", "metric") for fn in first.hooks(kind) if _requires_runtime(fn)]
    if needs_runtime:
        problems.append(f"its scoring functions {needs_runtime} need a sandbox runtime")
    if not first.hooks("reward"):
        problems.append("it defines no reward function")
    return problems


class VerifiersEnv:
    """One verifiers taskset: its tasks as `Task`s, one model turn per rollout, scored by the taskset."""

    tools: list[dict[str, Any]] | None = None

    def __init__(self, vf: Any, taskset: Any, args: VerifiersArgs) -> None:
        self._vf = vf
        self.name = args.taskset.rsplit("/", 1)[-1]
        view = taskset.take(args.limit) if args.limit is not None else taskset
        if not view.bounded:
            raise EnvError(f"environment 'verifiers': taskset {args.taskset!r} is infinite; set args.limit")
        vf_tasks = list(view)
        if len(vf_tasks) <= args.num_eval:
            raise EnvError(
                f"environment 'verifiers': taskset {args.taskset!r} has {len(vf_tasks)} tasks, not more than "
                f"args.num_eval={args.num_eval}; lower num_eval or raise limit"
            )
        problems = _unsupported(taskset, vf_tasks[0])
        if problems:
            raise EnvError(
                f"environment 'verifiers': taskset {args.taskset!r} cannot run on apprentice's client: "
                f"{'; '.join(problems)}. Only tool-less chat tasksets scored without a sandbox are supported"
            )
        # Task.key is verifiers' stable identity (content hash unless the taskset overrides it).
        self._vf_tasks: dict[str, Any] = {}
        tasks = []
        for vf_task in vf_tasks:
            task = Task(id=str(vf_task.key), prompt=self._prompt(vf_task.data), info={"vf_idx": vf_task.data.idx})
            self._vf_tasks[task.id] = vf_task
            tasks.append(task)
        if len(self._vf_tasks) != len(tasks):
            raise EnvError(f"environment 'verifiers': taskset {args.taskset!r} has tasks with duplicate keys")
        cut = len(tasks) - args.num_eval
        self._splits: dict[str, list[Task]] = {"train": tasks[:cut], "eval": tasks[cut:]}

    def _prompt(self, data: Any) -> list[dict[str, Any]]:
        """TaskData (system_prompt + str or Messages prompt) -> OpenAI chat messages."""
        from verifiers.v1.dialects.chat import message_to_wire

        messages: list[dict[str, Any]] = []
        if data.system_prompt:
            messages.append({"role": "system", "content": data.system_prompt})
        if isinstance(data.prompt, str):
            messages.append({"role": "user", "content": data.prompt})
        else:
            messages += [message_to_wire(m) for m in data.prompt or []]
        return messages

    def tasks(self, split: Split) -> list[Task]:
        if split not in self._splits:
            raise ValueError(f"environment {self.name!r}: unknown split {split!r}; use 'train' or 'eval'")
        return list(self._splits[split])

    async def rollout(self, task: Task, client: ChatClient, key: str) -> Trajectory:
        vf_task = self._vf_tasks[task.id]
        prompt = [dict(m) for m in task.prompt]
        response = await client.chat(prompt, tools=None, key=f"{key}/turn-0")
        message = assistant_message(response, turn=0)
        trace = self._trace(vf_task, prompt, message, response.finish_reason)
        with reward_function(f"of taskset {self.name!r}"):
            await vf_task.score(trace)  # no runtime: the taskset was checked to need none
        rewards = {name: r.score for name, r in trace.rewards.items() if r is not None}
        metrics = {"num_turns": 1.0}
        metrics |= {f"reward_{name}": float(v) for name, v in rewards.items()}
        metrics |= {name: float(v) for name, v in trace.metrics.items() if v is not None}
        return make_trajectory(
            env=self.name,
            task_id=task.id,
            steps=[make_step(prompt, [message], response)],
            tools=None,
            reward=trace.reward,
            metrics=metrics,
            truncated=response.finish_reason == "length",
        )

    def _trace(self, vf_task: Any, prompt: list[dict[str, Any]], message: Mapping[str, Any], finish: str) -> vf.Trace:
        """The verifiers Trace its scoring functions read: prompt nodes, then the sampled assistant node."""
        from verifiers.v1.dialects.chat import parse_message

        vf = self._vf
        nodes = [vf.MessageNode(parent=i - 1 if i else None, message=parse_message(m)) for i, m in enumerate(prompt)]
        nodes.append(vf.MessageNode(parent=len(nodes) - 1, message=parse_message(message), sampled=True))
        finish_reason = finish if finish in ("stop", "length", "tool_calls") else None
        return vf.Trace(
            task=vf.TraceTask(type=type(vf_task).__name__, data=vf_task.data, key=vf_task.key, hash=vf_task.hash),
            agent=vf.AgentInfo(config=vf.AgentConfig()),
            nodes=nodes,
            calls=[vf.ModelCall(node=len(nodes) - 1, finish_reason=finish_reason)],
            is_completed=True,
            ok=True,
        )


def make_verifiers_env(args: VerifiersArgs, seed: int) -> VerifiersEnv:
    """Load the taskset `args` names (verifiers imported here, so apprentice runs without the extra)."""
    vf = _import_verifiers()
    try:
        config_cls = vf.taskset_config_type(args.taskset)
        taskset = vf.load_taskset(config_cls.model_validate({**args.config, "id": args.taskset}))
    except (ModuleNotFoundError, AttributeError, TypeError, ValueError) as e:
        raise EnvError(f"environment 'verifiers': cannot load taskset {args.taskset!r}: {e}") from e
    return VerifiersEnv(vf, taskset, args)
