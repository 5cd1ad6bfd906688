"""The `prompts` environment: chat prompts from a JSONL file or a saved Hugging Face `datasets` directory.

Each row is either `{"messages": [...]}` (a chat prompt ending with a user turn) or `{"question": ...}` with
optional `system`; both may carry `answer` (the reference of the reward) and `id`. Other keys go to `Task.info`.

    [[orchestrator.env]]
    id = "prompts"
    args = { path = "data/train.jsonl", eval_fraction = 0.1, reward = "exact" }
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from apprentice.envs.base import EnvError, Task
from apprentice.envs.rewards import MATCHERS, MatchOptions
from apprentice.envs.single_turn import SingleTurnEnv

log = logging.getLogger("apprentice.envs")

_ROLES = {"system", "user", "assistant", "tool"}
_KNOWN_KEYS = {"id", "messages", "question", "system", "answer"}


class PromptsArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1)
    """A JSONL file (one JSON object per line) or a directory written by `datasets`' `save_to_disk`."""
    split: str = "train"
    """Which split to read when `path` holds a `DatasetDict`."""
    eval_path: str | None = None
    """Held-out tasks from another file or dataset directory (exclusive with eval_fraction)."""
    eval_split: str | None = None
    """Held-out tasks from this split of the `path` dataset directory (exclusive with the other eval options)."""
    eval_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Hold out this share of the rows as eval tasks (a seeded, deterministic choice)."""
    reward: Literal["none", "exact", "contains", "regex"] = "none"
    """How the answer is scored against the row's `answer`: equality, substring, or `answer` as a regex."""
    ignore_case: bool = True
    """Case-insensitive matching."""
    normalize_whitespace: bool = True
    """Collapse whitespace runs and strip both ends before exact/contains matching."""
    system_prompt: str | None = None
    """A system message for rows that have none."""
    name: str = Field(default="prompts", min_length=1)
    """Name in metrics; give two prompts environments different names."""
    seed: int | None = None
    """Seed of the eval_fraction split; defaults to the run's seed."""

    @model_validator(mode="after")
    def _one_eval_source(self) -> PromptsArgs:
        given = [k for k in ("eval_path", "eval_split") if getattr(self, k) is not None]
        given += ["eval_fraction"] if self.eval_fraction > 0 else []
        if len(given) > 1:
            raise ValueError(f"set only one of eval_path, eval_split, eval_fraction (got {', '.join(given)})")
        return self


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    for line_no, raw in enumerate(path.read_bytes().splitlines(), 1):
        where = f"{path} line {line_no}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise EnvError(f"{where}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); save the file "
                           "as UTF-8") from None  # fmt: skip
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EnvError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(row, dict):
            raise EnvError(f"{where}: expected a JSON object, got {type(row).__name__}")
        yield where, row


def _dataset_rows(path: Path, split: str, require_split: bool) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        import datasets  # optional extra: only users of dataset directories need it
    except ImportError as e:
        raise EnvError(
            f"{path} is a directory, read as a Hugging Face `datasets` directory, but `datasets` is not "
            "installed: run `pip install apprentice[datasets]` (or point `path` at a JSONL file)"
        ) from e
    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise EnvError(f"{path}: no split {split!r}; the dataset has {sorted(data)} (set `split`/`eval_split`)")
        data = data[split]
    elif require_split:
        raise EnvError(f"{path} holds one dataset, not a DatasetDict of splits; eval_split {split!r} cannot apply")
    for i, row in enumerate(data):
        yield f"{path} row {i}", dict(row)


def _rows(path_str: str, split: str, require_split: bool = False) -> list[tuple[str, dict[str, Any]]]:
    path = Path(path_str).expanduser()
    if not path.exists():
        raise EnvError(f"prompts: {path} does not exist (args.path / args.eval_path)")
    if require_split and not path.is_dir():
        raise EnvError(
            f"prompts: eval_split needs a `datasets` directory with splits; {path} is a file (use eval_path)"
        )
    if not path.is_dir() and split != "train":
        raise EnvError(f"prompts: split {split!r} applies to a `datasets` directory of splits; {path} is a file, "
                       "read whole (remove `split`)")  # fmt: skip
    rows = list(_dataset_rows(path, split, require_split) if path.is_dir() else _jsonl_rows(path))
    if not rows:
        raise EnvError(f"prompts: {path} has no rows")
    return rows


def _messages(where: str, value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise EnvError(f"{where}: 'messages' must be a non-empty list of chat messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise EnvError(f"{where}: messages[{i}] needs a 'role' in {sorted(_ROLES)}, got {m!r}")
        if not isinstance(m.get("content"), str) and not m.get("tool_calls"):
            raise EnvError(f"{where}: messages[{i}] ({m['role']}) has no string 'content'")
    if value[-1]["role"] != "user":
        raise EnvError(
            f"{where}: 'messages' must end with a user turn (the prompt to answer), it ends with "
            f"{value[-1]['role']!r}; drop the trailing turn or move the reference answer to 'answer'"
        )
    return [dict(m) for m in value]


def row_to_task(where: str, row: dict[str, Any], index: int, args: PromptsArgs, id_prefix: str = "") -> Task:
    """One row -> Task, or an EnvError naming `where` (file and line) and what is missing."""
    if "messages" in row:
        beside = [k for k in ("system", "question") if k in row]
        if beside:  # they would be dropped without a word: the prompt is `messages` alone
            raise EnvError(f"{where}: a row with 'messages' cannot also have {' or '.join(repr(k) for k in beside)}; "
                           "put the system message (and the question) into 'messages'")  # fmt: skip
        prompt = _messages(where, row["messages"])
        if args.system_prompt and prompt[0]["role"] != "system":
            prompt.insert(0, {"role": "system", "content": args.system_prompt})
    elif "question" in row:
        question, system = row["question"], row.get("system") or args.system_prompt
        if not isinstance(question, str) or not question.strip():
            raise EnvError(f"{where}: 'question' must be a non-empty string, got {question!r}")
        if system is not None and not isinstance(system, str):
            raise EnvError(f"{where}: 'system' must be a string, got {system!r}")
        prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    else:
        raise EnvError(f"{where}: row needs 'messages' or 'question', it has keys {sorted(row)}")
    answer = row.get("answer")
    if args.reward != "none":
        if answer is None or (isinstance(answer, str) and not answer.strip()):
            raise EnvError(f"{where}: reward={args.reward!r} needs an 'answer' in every row; this row has none")
        if isinstance(answer, bool) or not isinstance(answer, str | int):  # str(3.0) == "3.0" never matches "3"
            raise EnvError(f"{where}: 'answer' must be a string (or a whole number), got {answer!r}; write it as the "
                           "text a right reply holds (several right answers: reward = \"regex\" with an alternation)")  # fmt: skip
        answer = str(answer)
        if args.reward == "regex":
            try:
                re.compile(answer)
            except re.error as e:
                raise EnvError(f"{where}: 'answer' is not a valid regular expression ({e})") from e
    task_id = id_prefix + str(row.get("id", index))
    return Task(id=task_id, prompt=prompt, answer=answer, info={k: v for k, v in row.items() if k not in _KNOWN_KEYS})


def _tasks(rows: list[tuple[str, dict[str, Any]]], args: PromptsArgs, id_prefix: str = "") -> list[Task]:
    tasks: list[Task] = []
    seen: dict[str, str] = {}
    for i, (where, row) in enumerate(rows):
        task = row_to_task(where, row, i, args, id_prefix)
        if task.id in seen:
            raise EnvError(f"{where}: duplicate id {task.id!r} (first at {seen[task.id]}); ids must be unique")
        seen[task.id] = where
        tasks.append(task)
    return tasks


def split_holdout(tasks: list[Task], fraction: float, seed: int) -> tuple[list[Task], list[Task]]:
    """(train, eval): a seeded choice of round(len * fraction) eval tasks (at least one, never all); both keep
    the file order."""
    if fraction <= 0:
        return tasks, []
    n_eval = min(max(1, round(len(tasks) * fraction)), len(tasks) - 1)
    order = list(range(len(tasks)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return [t for i, t in enumerate(tasks) if i not in held], [t for i, t in enumerate(tasks) if i in held]


def make_prompts_env(args: PromptsArgs, seed: int) -> SingleTurnEnv:
    tasks = _tasks(_rows(args.path, args.split), args)
    if args.eval_path is not None:
        train, eval_ = tasks, _tasks(_rows(args.eval_path, args.split), args, id_prefix="eval/")
    elif args.eval_split is not None:
        train, eval_ = tasks, _tasks(_rows(args.path, args.eval_split, require_split=True), args, id_prefix="eval/")
    else:
        train, eval_ = split_holdout(tasks, args.eval_fraction, args.seed if args.seed is not None else seed)
    if not train:
        raise EnvError(f"prompts: {args.path} leaves no training tasks")
    # A held-out score on prompts the policy trained on is no held-out score. The same file for both says it on
    # purpose (an evaluation-only environment, as the demo's `format`); an overlap otherwise is an accident.
    same_file = args.eval_path is not None and Path(args.eval_path).resolve() == Path(args.path).resolve()
    trained = set() if same_file else {json.dumps(t.prompt, sort_keys=True) for t in train}
    leaked = [t for t in eval_ if json.dumps(t.prompt, sort_keys=True) in trained]
    if leaked:
        log.warning("prompts %r: %d of %d eval tasks have the prompt of a training task (e.g. %s); left out of the "
                    "evaluation", args.name, len(leaked), len(eval_), leaked[0].id)  # fmt: skip
        leaked_ids = {t.id for t in leaked}
        eval_ = [t for t in eval_ if t.id not in leaked_ids]
    opts = MatchOptions(ignore_case=args.ignore_case, normalize_whitespace=args.normalize_whitespace)
    matcher = MATCHERS.get(args.reward)  # None for reward = "none"

    def score(text: str, task: Task) -> tuple[float, dict[str, float]]:
        if matcher is None:
            return 0.0, {}
        return matcher(text, task.answer, opts), {}

    return SingleTurnEnv(args.name, train, eval_, score)
