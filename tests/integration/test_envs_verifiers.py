"""The `verifiers` adapter: a real verifiers 0.4 taskset (written to a temp dir, in-memory data) rolled out through
apprentice's teacher client against a strict loopback server, and scored by the taskset's own reward functions."""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

# `make test` installs the extra and sets APPRENTICE_TEST_EXTRAS=1: there a missing verifiers is a failure, not a skip.
if os.environ.get("APPRENTICE_TEST_EXTRAS") == "1":
    import verifiers.v1  # noqa: F401
else:
    pytest.importorskip("verifiers.v1")

from fault_teacher import FaultTeacher  # noqa: E402

from apprentice.clients.openai_client import OpenAIChatClient  # noqa: E402
from apprentice.config import EndpointConfig, EnvConfig, SamplingConfig  # noqa: E402
from apprentice.envs.base import EnvError  # noqa: E402
from apprentice.envs.registry import load_environment  # noqa: E402

# A plain verifiers taskset: TaskData subclass with an answer field, an exact-match reward (weight 2), a metric.
TASKSET_SRC = '''
import verifiers.v1 as vf

class EchoData(vf.TaskData):
    answer: str

class EchoTask(vf.Task[EchoData, vf.State, vf.TaskConfig]):
    @vf.reward(weight=2.0)
    async def exact(self, task, trace) -> float:
        return float(trace.last_reply == task.answer)

    @vf.metric
    async def reply_chars(self, trace) -> float:
        return float(len(trace.last_reply))

class EchoTaskset(vf.Taskset[EchoTask, vf.TasksetConfig]):
    def load(self):
        rows = [("alpha", "echo: alpha"), ("beta", "echo: beta"), ("gamma", "wrong on purpose")]
        for prompt, answer in rows:
            yield EchoTask(EchoData(prompt=prompt, answer=answer, system_prompt="Repeat."), self.config.task)

__all__ = ["EchoTaskset"]
'''

# A taskset whose reward reads the sandbox: it cannot be scored without a verifiers runtime.
SANDBOX_SRC = '''
import verifiers.v1 as vf

class BoxTask(vf.Task):
    @vf.reward
    async def file_exists(self, trace, runtime) -> float:
        return 1.0

class BoxTaskset(vf.Taskset[BoxTask, vf.TasksetConfig]):
    def load(self):
        yield BoxTask(vf.TaskData(prompt="hi"), self.config.task)

__all__ = ["BoxTaskset"]
'''


@pytest.fixture
def tasksets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "apprentice_vf_echo.py").write_text(textwrap.dedent(TASKSET_SRC))
    (tmp_path / "apprentice_vf_box.py").write_text(textwrap.dedent(SANDBOX_SRC))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in ("apprentice_vf_echo", "apprentice_vf_box"):
        sys.modules.pop(name, None)


def _client(teacher: FaultTeacher, cache_dir: Path) -> OpenAIChatClient:
    endpoint = EndpointConfig(base_url=teacher.base_url, model="teacher", api_key_var="APPRENTICE_VF_TEST_KEY")
    return OpenAIChatClient(
        endpoint, SamplingConfig(max_tokens=16), max_concurrency=4, use_token_client=False, cache_dir=cache_dir
    )


def _rollouts(env: Any, teacher: FaultTeacher, cache_dir: Path) -> tuple[list[dict[str, Any]], dict[str, float]]:
    async def go() -> tuple[list[dict[str, Any]], dict[str, float]]:
        client = _client(teacher, cache_dir)
        try:
            tasks = env.tasks("train") + env.tasks("eval")
            trajs = await asyncio.gather(*(env.rollout(t, client, f"vf/{t.id}/0") for t in tasks))
            return list(trajs), client.metrics()
        finally:
            await client.aclose()

    return asyncio.run(go())


def test_verifiers_taskset_rolls_out_through_our_client(
    tasksets: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("APPRENTICE_VF_TEST_KEY", "sk-vf-test")
    env = load_environment(EnvConfig(id="verifiers", args={"taskset": "apprentice_vf_echo", "num_eval": 1}))
    assert env.name == "apprentice_vf_echo"
    assert [t.prompt[-1]["content"] for t in env.tasks("train")] == ["alpha", "beta"]
    assert [t.prompt[-1]["content"] for t in env.tasks("eval")] == ["gamma"]
    assert env.tasks("train")[0].prompt == [
        {"role": "system", "content": "Repeat."},
        {"role": "user", "content": "alpha"},
    ]

    with FaultTeacher(api_key="sk-vf-test") as teacher:
        trajs, _ = _rollouts(env, teacher, tmp_path / "cache")
        assert teacher.unknown_fields() == [] and teacher.token_fields() == []
        assert len(teacher.chat_requests()) == 3
        again, metrics = _rollouts(env, teacher, tmp_path / "cache")  # a rerun is served from the cache
        assert len(teacher.chat_requests()) == 3

    by_prompt = {t["steps"][0]["prompt"][-1]["content"]: t for t in trajs}
    alpha = by_prompt["alpha"]
    assert alpha["steps"] == [
        {
            "prompt": [{"role": "system", "content": "Repeat."}, {"role": "user", "content": "alpha"}],
            "completion": [{"role": "assistant", "content": "echo: alpha"}],
        }
    ]
    assert alpha["reward"] == 2.0  # the taskset's weight applies
    assert alpha["metrics"] == {"num_turns": 1.0, "reward_exact": 1.0, "reply_chars": float(len("echo: alpha"))}
    assert alpha["error"] is None and alpha["truncated"] is False and alpha["tools"] is None
    assert by_prompt["beta"]["reward"] == 2.0
    assert by_prompt["gamma"]["reward"] == 0.0 and by_prompt["gamma"]["metrics"]["reward_exact"] == 0.0
    assert [t["reward"] for t in again] == [t["reward"] for t in trajs]
    assert metrics["teacher/cache_hits"] == 3


def test_verifiers_taskset_needing_a_sandbox_is_refused(tasksets: None) -> None:
    with pytest.raises(EnvError, match=r"file_exists.*sandbox runtime"):
        load_environment(EnvConfig(id="verifiers", args={"taskset": "apprentice_vf_box"}))


def test_verifiers_unknown_taskset_and_bad_args_name_the_fix(tasksets: None) -> None:
    with pytest.raises(EnvError, match="cannot load taskset 'no_such_taskset_xyz'"):
        load_environment(EnvConfig(id="verifiers", args={"taskset": "no_such_taskset_xyz"}))
    with pytest.raises(EnvError, match="num_eval=3"):
        load_environment(EnvConfig(id="verifiers", args={"taskset": "apprentice_vf_echo", "num_eval": 3}))
    with pytest.raises(EnvError, match="accepted args"):
        load_environment(EnvConfig(id="verifiers", args={"taskset": "apprentice_vf_echo", "split": 1}))
