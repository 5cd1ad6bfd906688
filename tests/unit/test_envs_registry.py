"""Loading environments: built-ins and their args, import-path user environments, the prompts datasets, seeded
task generation, and the error messages users see."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from apprentice.clients.base import ChatResponse
from apprentice.config import EnvConfig
from apprentice.envs.base import EnvError
from apprentice.envs.registry import BUILTINS, load_environment


def load(env_id: str, seed: int = 0, **args: Any) -> Any:
    return load_environment(EnvConfig(id=env_id, args=args), seed=seed)


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---- built-ins, seeds ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("env_id", ["reverse-text", "tool-calculator"])
def test_synthetic_tasks_are_seeded(env_id: str) -> None:
    a = load(env_id, seed=5, num_tasks=20, num_eval_tasks=5).tasks("train")
    b = load(env_id, seed=5, num_tasks=20, num_eval_tasks=5).tasks("train")
    c = load(env_id, seed=6, num_tasks=20, num_eval_tasks=5).tasks("train")
    assert [t.prompt for t in a] == [t.prompt for t in b]
    assert [t.prompt for t in a] != [t.prompt for t in c]
    # An explicit args.seed wins over the run's seed.
    args_seed = {"num_tasks": 20, "num_eval_tasks": 5, "seed": 5}
    e = load_environment(EnvConfig(id=env_id, args=args_seed), seed=99).tasks("train")
    assert [t.prompt for t in e] == [t.prompt for t in a]
    # The training set does not change with the eval size, and eval tasks never appear in training.
    f = load(env_id, seed=5, num_tasks=20, num_eval_tasks=50)
    assert [t.prompt for t in f.tasks("train")] == [t.prompt for t in a]
    train_prompts = {json.dumps(t.prompt) for t in f.tasks("train")}
    assert len(f.tasks("eval")) == 50
    assert not train_prompts & {json.dumps(t.prompt) for t in f.tasks("eval")}
    assert len({t.id for t in f.tasks("train") + f.tasks("eval")}) == 70


def test_prompts_files_that_were_misread_are_clear_errors_and_eval_never_repeats_a_training_prompt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"question": "ok"}\n{"question": "caf\xe9"}\n')
    with pytest.raises(EnvError, match=r"latin1\.jsonl line 2: not UTF-8 \(byte 0xe9 at column 18\)"):
        load("prompts", path=str(latin1))  # was a bare UnicodeDecodeError naming neither file nor line
    path = write_jsonl(tmp_path / "data.jsonl", [{"question": f"q{i}"} for i in range(5)])
    with pytest.raises(EnvError, match=r"split 'test' applies to a `datasets` directory .* is a file"):
        load("prompts", path=str(path), split="test")  # was read whole as training data
    overlapping = write_jsonl(tmp_path / "eval.jsonl", [{"question": q} for q in ("q1", "new", "q3")])
    with caplog.at_level("WARNING", logger="apprentice.envs"):
        env = load("prompts", path=str(path), eval_path=str(overlapping))
    assert [t.prompt[-1]["content"] for t in env.tasks("eval")] == ["new"]  # q1 and q3 were trained on
    assert "2 of 3 eval tasks have the prompt of a training task" in caplog.text
    # The same file for both is an evaluation-only environment on purpose (the demo's `format`): kept whole.
    assert len(load("prompts", path=str(path), eval_path=str(path)).tasks("eval")) == 5


def test_reverse_text_alphabets_that_hung_or_could_not_be_scored_are_refused() -> None:
    with pytest.raises(EnvError, match=r"alphabet 'aa' repeats a character"):
        load("reverse-text", num_tasks=2, num_eval_tasks=0, min_len=2, max_len=2, alphabet="aa")  # looped forever
    with pytest.raises(EnvError, match=r"alphabet .* holds \[' '\]: whitespace and quote characters"):
        load("reverse-text", alphabet="abc ")  # a right answer ending in a space scored 0.875


def test_reverse_text_args() -> None:
    env = load("reverse-text", num_tasks=20, num_eval_tasks=4, min_len=3, max_len=4, alphabet="ab", name="rev-ab")
    assert env.name == "rev-ab"
    for task in env.tasks("train"):
        text = task.prompt[-1]["content"]
        assert 3 <= len(text) <= 4 and set(text) <= {"a", "b"} and task.answer == text[::-1]
    with pytest.raises(EnvError, match=r"only 24 distinct texts .* asked for 30 \(num_tasks \+ num_eval_tasks\)"):
        load("reverse-text", num_tasks=20, num_eval_tasks=10, min_len=3, max_len=4, alphabet="ab")


def test_tool_calculator_tasks_have_integer_answers() -> None:
    from apprentice.envs.calculator import evaluate

    env = load("tool-calculator", num_tasks=30, num_eval_tasks=0, max_ops=4)
    for task in env.tasks("train"):
        assert isinstance(task.answer, int)
        assert evaluate(task.info["expression"]) == task.answer
        assert task.prompt[-1]["content"] == f"What is {task.info['expression']}?"


def test_builtin_arg_errors_name_the_env_and_the_arg() -> None:
    with pytest.raises(EnvError, match=r"'reverse-text': args\.num_taks: unknown argument; did you mean 'num_tasks'\?.*accepted args: num_tasks"):
        load("reverse-text", num_taks=3)
    with pytest.raises(EnvError, match=r"'reverse-text'.*min_len \(9\) must be <= max_len \(4\)"):
        load("reverse-text", min_len=9, max_len=4)
    with pytest.raises(EnvError, match=r"'tool-calculator': args\.max_turns: Input should be greater than or equal"):
        load("tool-calculator", max_turns=0)
    with pytest.raises(EnvError, match=r"'prompts': args\.path: Field required"):
        load("prompts")


def test_unknown_id_lists_builtins_and_suggests() -> None:
    with pytest.raises(EnvError, match=r"unknown environment 'reverse_text': did you mean 'reverse-text'\?") as e:
        load("reverse_text")
    assert all(name in str(e.value) for name in BUILTINS)
    with pytest.raises(EnvError, match=r"unknown environment 'zzz': built-ins are prompts, reverse-text"):
        load("zzz")


# ---- import-path environments -------------------------------------------------------------------------------

USER_ENV = """
from apprentice.envs.base import Task

class EchoEnv:
    tools = None

    def __init__(self, name, n, seed):
        self.name, self._tasks = name, [Task(id=f"t{i}", prompt=[{"role": "user", "content": f"{seed}-{i}"}]) for i in range(n)]

    def tasks(self, split):
        return list(self._tasks) if split == "train" else []

    async def rollout(self, task, client, key):
        r = await client.chat(task.prompt, key=key)
        return {"steps": [{"prompt": task.prompt, "completion": [r.message]}], "tools": None, "reward": 1.0,
                "metrics": {}, "error": None, "task_id": task.id, "env": self.name, "truncated": False}

def make_env(n: int = 2, *, name: str = "echo", seed: int = 0):
    return EchoEnv(name, n, seed)

def make_plain(n):
    return EchoEnv("plain", n, 0)

def make_broken(**kwargs):
    raise TypeError("make_broken() got an unexpected keyword argument 'x'")

class NotAnEnv:
    name = 3
    def rollout(self, task, client, key):
        return {}

def make_bad():
    return NotAnEnv()

VALUE = 7
"""


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = f"user_envs_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_ENV))
    (tmp_path / f"{name}_broken.py").write_text("import package_that_does_not_exist_xyz\n")
    (tmp_path / f"{name}_syntax.py").write_text("def make(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    for mod in (name, f"{name}_broken", f"{name}_syntax"):
        sys.modules.pop(mod, None)


class _Echo:
    async def chat(self, messages: list[dict[str, Any]], *, tools: Any = None, key: str = "") -> ChatResponse:
        return ChatResponse(
            message={"role": "assistant", "content": messages[-1]["content"][::-1]}, finish_reason="stop"
        )


def test_import_path_environment(user_module: str) -> None:
    env = load(f"{user_module}:make_env", seed=4, n=3, name="mine")
    assert env.name == "mine" and [t.prompt[0]["content"] for t in env.tasks("train")] == ["4-0", "4-1", "4-2"]
    traj = asyncio.run(env.rollout(env.tasks("train")[1], _Echo(), "k"))
    assert traj["steps"][0]["completion"] == [{"role": "assistant", "content": "1-4"}]
    # A factory without a `seed` parameter is not given one.
    assert load(f"{user_module}:make_plain", n=1).name == "plain"


def test_import_path_errors(user_module: str) -> None:
    with pytest.raises(EnvError, match=r"cannot import module 'no_such_module_xyz'.*PYTHONPATH"):
        load("no_such_module_xyz:make")
    with pytest.raises(EnvError, match=r"importing '.*_syntax' failed: SyntaxError: .*line 1"):
        load(f"{user_module}_syntax:make")  # was a bare SyntaxError traceback
    with pytest.raises(
        EnvError, match=r"importing '.*_broken' failed: No module named 'package_that_does_not_exist_xyz'"
    ):
        load(f"{user_module}_broken:make")
    with pytest.raises(EnvError, match=r"has no attribute 'make_nv'; its callables are: .*make_env"):
        load(f"{user_module}:make_nv")
    with pytest.raises(EnvError, match=r"'VALUE' is a int, not a callable factory"):
        load(f"{user_module}:VALUE")
    with pytest.raises(EnvError, match=r"import path is 'package.module:factory'"):
        load(":make_env")
    with pytest.raises(EnvError, match=r"args \{'n': 1, 'colour': 'red'\} do not fit its factory\(n: int = 2.*colour"):
        load(f"{user_module}:make_env", n=1, colour="red")
    with pytest.raises(EnvError, match=r"args \{\} do not fit.*missing a required argument: 'n'"):
        load(f"{user_module}:make_plain")
    with pytest.raises(EnvError, match=r"factory raised TypeError with args \{'x': 1\}"):
        load(f"{user_module}:make_broken", x=1)
    with pytest.raises(
        EnvError,
        match=r"not an Environment \(no attribute 'tools'; no attribute 'tasks'; "
        r"'rollout' is not an async method; 'name' is a int, not a str\)",
    ):
        load(f"{user_module}:make_bad")


# ---- prompts ------------------------------------------------------------------------------------------------


def test_prompts_rows_to_tasks(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "data.jsonl",
        [
            {"question": "2+2?", "answer": 4, "source": "arith"},
            "",
            {"id": "q-sys", "question": "Hi", "system": "Be brief."},
            {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]},
        ],
    )
    env = load("prompts", path=str(path), system_prompt="Default system.")
    t0, t1, t2 = env.tasks("train")
    assert t0.prompt == [{"role": "system", "content": "Default system."}, {"role": "user", "content": "2+2?"}]
    assert t0.answer == 4 and t0.info == {"source": "arith"} and t0.id == "0"
    assert t1.id == "q-sys" and t1.prompt[0] == {"role": "system", "content": "Be brief."}
    assert t2.prompt == [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert env.tasks("eval") == [] and env.tools is None


@pytest.mark.parametrize(
    ("rows", "args", "message"),
    [
        (['{"question": "a"'], {}, r"data\.jsonl line 1: not valid JSON"),
        ([{"question": "a"}, [1, 2]], {}, r"data\.jsonl line 2: expected a JSON object, got list"),
        ([{"question": "a"}, {}, {"prompt": "x"}], {}, r"line 2: row needs 'messages' or 'question', it has keys \[\]"),
        ([{"question": ""}], {}, r"line 1: 'question' must be a non-empty string"),
        (
            [{"question": "a", "answer": "b"}, {"question": "c"}],
            {"reward": "exact"},
            r"line 2: reward='exact' needs an 'answer' in every row",
        ),
        ([{"question": "a", "answer": "(unclosed"}], {"reward": "regex"}, r"line 1: 'answer' is not a valid regular"),
        (
            [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}],
            {},
            r"line 1: 'messages' must end with a user turn.*ends with 'assistant'",
        ),
        ([{"messages": [{"content": "a"}]}], {}, r"line 1: messages\[0\] needs a 'role'"),
        ([{"messages": []}], {}, r"line 1: 'messages' must be a non-empty list"),
        (
            [{"id": 1, "question": "a"}, {"id": 1, "question": "b"}],
            {},
            r"line 2: duplicate id '1' \(first at .*line 1\)",
        ),
        ([""], {}, r"has no rows"),
        # These were dropped or stringified without a word (the system message lost; 3.0 never matching "3").
        (
            [{"messages": [{"role": "user", "content": "hi"}], "system": "You are a pirate"}],
            {},
            r"line 1: a row with 'messages' cannot also have 'system'",
        ),
        ([{"question": "1.5 + 1.5?", "answer": 3.0}], {"reward": "exact"}, r"line 1: 'answer' must be a string .*got 3\.0"),
        ([{"question": "2 + 2?", "answer": ["4", "four"]}], {"reward": "exact"}, r"'answer' must be a string .*regex"),
    ],
)
def test_prompts_bad_rows_name_file_and_line(
    tmp_path: Path, rows: list[Any], args: dict[str, Any], message: str
) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(EnvError, match=message):
        load("prompts", path=str(path), **args)


def test_prompts_eval_fraction_is_deterministic_and_disjoint(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": f"q{i}"} for i in range(20)])
    a = load("prompts", seed=1, path=str(path), eval_fraction=0.25)
    b = load("prompts", seed=1, path=str(path), eval_fraction=0.25)
    c = load("prompts", seed=2, path=str(path), eval_fraction=0.25)
    ids = lambda env, split: [t.id for t in env.tasks(split)]  # noqa: E731
    assert len(ids(a, "eval")) == 5 and len(ids(a, "train")) == 15
    assert ids(a, "eval") == ids(b, "eval") and ids(a, "eval") != ids(c, "eval")
    assert not set(ids(a, "eval")) & set(ids(a, "train"))
    assert ids(a, "train") == sorted(ids(a, "train"), key=int)  # file order kept
    tiny = write_jsonl(tmp_path / "t.jsonl", [{"question": "x"}, {"question": "y"}])
    assert len(load("prompts", path=str(tiny), eval_fraction=0.01).tasks("eval")) == 1  # at least one, never all


def test_prompts_eval_path_and_option_conflicts(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [{"question": "a"}])
    held = write_jsonl(tmp_path / "eval.jsonl", [{"question": "b"}])
    env = load("prompts", path=str(train), eval_path=str(held))
    assert [t.id for t in env.tasks("eval")] == ["eval/0"] and env.tasks("eval")[0].prompt[-1]["content"] == "b"
    with pytest.raises(EnvError, match="set only one of eval_path, eval_split, eval_fraction"):
        load("prompts", path=str(train), eval_path=str(held), eval_fraction=0.5)
    with pytest.raises(
        EnvError, match=r"eval_split needs a `datasets` directory with splits; .*train\.jsonl is a file"
    ):
        load("prompts", path=str(train), eval_split="test")
    with pytest.raises(EnvError, match=r"missing\.jsonl does not exist"):
        load("prompts", path=str(tmp_path / "missing.jsonl"))


def test_prompts_dataset_directory(tmp_path: Path) -> None:
    if importlib.util.find_spec("datasets") is None:
        # Without the optional extra, the user is told what to install.
        with pytest.raises(EnvError, match=r"pip install apprentice\[datasets\]"):
            load("prompts", path=str(tmp_path))
        return
    import datasets

    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list([{"question": "a", "answer": "x"}, {"question": "b", "answer": "y"}]),
            "test": datasets.Dataset.from_list([{"question": "c", "answer": "z"}]),
        }
    ).save_to_disk(str(tmp_path / "ds"))
    env = load("prompts", path=str(tmp_path / "ds"), eval_split="test", reward="exact")
    assert [t.answer for t in env.tasks("train")] == ["x", "y"] and [t.answer for t in env.tasks("eval")] == ["z"]
    with pytest.raises(EnvError, match=r"no split 'valid'; the dataset has \['test', 'train'\]"):
        load("prompts", path=str(tmp_path / "ds"), split="valid")
