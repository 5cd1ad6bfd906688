"""Which distillation signal wins: off-policy SFT, off-policy top-k soft labels, sampled-token on-policy, top-k
on-policy (issue 17's experiment), on two tasks, with SmolLM2-135M-Instruct as student and as teacher.

    HF_HUB_OFFLINE=1 python bench/topk_distill.py [--output-dir runs/topk-bench] [--steps 20] [--part a|b|ab]

(a) The demo's capitals task: the teacher is the model with hidden instructions and worked examples
    (configs/demo/teacher_prompt.json) answering with the bare city. Held-out reward (right city alone) and
    bare-city share on the 40 held-out countries, greedy.
(b) A student far from its teacher: the teacher is told in a hidden system prompt to "Reply in French, in one
    short sentence" (bench/data/french-teacher.txt); 30 everyday English questions train, 10 are held out
    (bench/data/french-*.jsonl, written for this bench). Held-out share of greedy replies in French (French
    function words), and per step the reverse KL each signal logs: on-policy, `distill/reverse_kl` of the
    student's samples under the teacher (orchestrator); top-k, the trainer's `distill/reverse_kl` over the
    teacher's top-k support plus tail. Off-policy SFT has no per-step KL to the teacher (it never sees the
    student's samples): its NLL of the teacher's text is plotted instead.

Each signal runs the same prompts per step, steps and optimizer (the configs under configs/demo/*capitals*.toml,
the env swapped for part b). Wall-clock is the training run alone (launch to exit); peak memory is the largest
resident set of any process of the run (ru_maxrss of its children: server, orchestrator or trainer). Prints
markdown tables, writes OUTPUT/topk_distill.png and OUTPUT/results.json. Rerunning resumes finished runs.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from apprentice.config import load_config
from apprentice.demo import FORMAT_ENV, TEACHER_PROMPT
from apprentice.eval import evaluate
from apprentice.inference.launch import free_port, local_server
from apprentice.metrics import read_metrics
from apprentice.plotting import pyplot, save_figure
from apprentice.testing.smollm2 import export_smollm2

DEMO = Path("configs/demo")
# signal -> (command, config); every config is the capitals demo's with one signal changed.
SIGNALS = {
    "off-policy SFT": ("distill", DEMO / "distill-capitals.toml"),
    "off-policy top-k": ("distill", DEMO / "distill-capitals-topk.toml"),
    "on-policy sampled-token": ("rl", DEMO / "opd-capitals.toml"),
    "on-policy top-k": ("rl", DEMO / "opd-capitals-topk.toml"),
}
DATA = Path("bench/data")
FRENCH = {"name": "french", "path": str(DATA / "french-train.jsonl"), "eval_path": str(DATA / "french-eval.jsonl")}
# Runs in its own process so that ru_maxrss of its children is this run's alone.
_WRAP = ("import resource, subprocess, sys; rc = subprocess.call([sys.executable, '-m', 'apprentice', *sys.argv[1:]]); "
         "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")  # fmt: skip


def train(command: str, config: Path, overrides: list[str], log: Path) -> tuple[float, float]:
    """(wall-clock s, peak RSS GiB) of one training run; exits on failure."""
    start = time.monotonic()
    with open(log, "a") as out:
        done = subprocess.run([sys.executable, "-c", _WRAP, command, str(config), *overrides], stdout=subprocess.PIPE,
                              stderr=out, text=True)  # fmt: skip
    if done.returncode != 0:
        sys.exit(f"{command} {config} failed (exit {done.returncode}); see {log}")
    peak_kb = max((int(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("PEAK_RSS_KB")), default=0)
    return time.monotonic() - start, peak_kb / 2**20


def overrides_for(signal: str, model_dir: Path, out: Path, teacher_url: str, steps: int, env: dict[str, str] | None) -> list[str]:
    command, _ = SIGNALS[signal]
    where = "rollout_model" if command == "distill" else "teacher_model"
    args = ["--model.name", str(model_dir), "--trainer.max_steps", str(steps), "--output_dir", str(out),
            f"--orchestrator.{where}.base_url", teacher_url]  # fmt: skip
    if command == "rl":
        args += ["--inference.port", str(free_port())]
    for key, value in (env or {}).items():
        args += [f"--orchestrator.env.0.args.{key}", value]
    if env is not None:
        # A sentence in French takes more tokens than a city: every signal samples up to 48 (as the evaluation
        # does), and a reply cut off there still shows the behaviour, so it is trained on (without an end of turn)
        # rather than set aside; distill mode's default drop left steps with nothing to train on.
        args += ["--orchestrator.sampling.max_tokens", "48", "--orchestrator.truncated", "keep"]
    return args


def held_out(eval_cfg: Any, model: str, part: str, num_tasks: int | None) -> dict[str, float]:
    """Greedy held-out scores of `model` (a directory or a URL) on the first `num_tasks` eval tasks (None: all)."""
    rewards = {r.env: r.reward for r in evaluate(eval_cfg, model, num_tasks)}
    if part == "a":  # the capitals env (right city alone) and the same questions scored on form only
        return {"reward": rewards["capitals"], "bare_city": rewards["format"]}
    return {"french_share": rewards["french"]}


def report(part: str, rows: dict[str, dict[str, Any]], steps: int, num_tasks: int | None) -> None:
    """The part's markdown table so far (printed after every row: a long run shows what it has)."""
    held = min(num_tasks or 10**9, 40 if part == "a" else 10)
    what = f"capitals, {held} held-out countries" if part == "a" else f"French teacher, {held} held-out questions"
    print(f"\npart {part} ({what}); greedy; {steps} steps of 8 prompts; 2-core CPU", flush=True)
    columns = [k for k in ("reward", "bare_city", "french_share", "wall_s", "peak_rss_gib") if any(k in r for r in rows.values())]
    print("| model | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, row in rows.items():
        cells = [(f"{row[c] / 60:.1f} min" if c == "wall_s" else f"{row[c]:.3f}") if c in row else "-" for c in columns]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


def run_part(part: str, model_dir: Path, out: Path, steps: int, num_tasks: int | None, signals: list[str]) -> dict[str, Any]:
    env = None if part == "a" else FRENCH
    hidden = (["--prompt-prefix-file", str(TEACHER_PROMPT)] if part == "a"
              else ["--system-prompt-file", str(DATA / "french-teacher.txt")])  # fmt: skip
    teacher_args = [*hidden, "--threads", "1", "--served-model-name", "teacher"]
    rows: dict[str, dict[str, Any]] = {}
    with local_server(model_dir, extra_args=teacher_args, log_path=out / "teacher_server.log") as url:
        base = ["--model.name", str(model_dir), "--output_dir", str(out / "eval"), "--orchestrator.rollout_model.base_url", url,
                "--orchestrator.sampling.temperature", "0", "--orchestrator.sampling.max_tokens", "48" if env else "24"]  # fmt: skip
        for key, value in (env or {}).items():
            base += [f"--orchestrator.env.0.args.{key}", value]
        eval_cfg = load_config([SIGNALS["off-policy SFT"][1]], base)
        if part == "a":
            eval_cfg.orchestrator.env = [*eval_cfg.orchestrator.env, FORMAT_ENV]
        print(f"== part {part}: teacher at {url}; scoring teacher and untrained student", flush=True)
        rows["teacher (hidden prompt)"] = held_out(eval_cfg, url, part, num_tasks)
        rows["student, untrained"] = held_out(eval_cfg, str(model_dir), part, num_tasks)
        report(part, rows, steps, num_tasks)
        for signal in signals:
            command, config = SIGNALS[signal]
            run_dir = out / signal.replace(" ", "_")
            print(f"== part {part}: {signal}", flush=True)
            wall, peak = train(command, config, overrides_for(signal, model_dir, run_dir, url, steps, env), out / "runs.log")
            rows[signal] = {"wall_s": wall, "peak_rss_gib": peak, "dir": str(run_dir)}
            rows[signal].update(held_out(eval_cfg, str(run_dir / "final"), part, num_tasks))
            (out / "results.json").write_text(json.dumps({"steps": steps, "results": rows}, indent=2))
            report(part, rows, steps, num_tasks)
    return rows


def curves(run_dir: Path, command: str, signal: str) -> tuple[str, list[tuple[int, float]]]:
    """The per-step KL (or NLL) series a signal logs, and its name."""
    trainer = read_metrics(run_dir / "trainer" / "metrics.jsonl")
    if "top-k" in signal:
        return "trainer distill/reverse_kl (top-k + tail)", [(m["step"], m["distill/reverse_kl"]) for m in trainer if "distill/reverse_kl" in m]
    if command == "rl":
        orch = read_metrics(run_dir / "orchestrator" / "metrics.jsonl")
        return "orchestrator distill/reverse_kl (sampled)", [(m["step"], m["distill/reverse_kl"]) for m in orch if "distill/reverse_kl" in m]
    return "trainer loss/nll (teacher text)", [(m["step"], m["loss/nll"]) for m in trainer if "loss/nll" in m]


def save_plot(out: Path, results: dict[str, dict[str, dict[str, Any]]]) -> Path | None:
    if (plt := pyplot()) is None:
        return None
    fig, axes = plt.subplots(1, 1 + len(results), figsize=(6 * (1 + len(results)), 4))
    for ax, (part, rows) in zip(axes[1:], results.items(), strict=True):
        names = list(rows)
        metrics = [k for k in rows[names[0]] if k in ("reward", "bare_city", "french_share")]
        width = 0.8 / len(metrics)
        for j, metric in enumerate(metrics):
            ax.bar([i + j * width for i in range(len(names))], [rows[n][metric] for n in names], width=width, label=metric)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=20, fontsize=7, ha="right")
        ax.set(title=f"part {part}: held-out, greedy", ylim=(0, 1.05))
        ax.legend(fontsize=8)
    last = list(results)[-1]
    for signal, (command, _) in SIGNALS.items():
        if signal not in results[last]:
            continue
        name, series = curves(Path(results[last][signal]["dir"]), command, signal)
        axes[0].plot([s for s, _ in series], [v for _, v in series], marker=".", label=f"{signal}: {name}")
    axes[0].set(title=f"part {last}: per-step divergence each signal logs", xlabel="step")
    axes[0].legend(fontsize=7)
    return save_figure(fig, out / "topk_distill.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/topk-bench")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--part", choices=["a", "b", "ab"], default="ab")
    parser.add_argument("--signals", default=",".join(SIGNALS), help=f"comma-separated subset of: {', '.join(SIGNALS)}")
    parser.add_argument("--eval-tasks", type=int, default=None, help="held-out tasks scored per env (default: all)")
    args = parser.parse_args(argv)
    signals = [name.strip() for name in args.signals.split(",")]
    if unknown := [name for name in signals if name not in SIGNALS]:
        parser.error(f"--signals: unknown {unknown}; choose from {list(SIGNALS)}")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = export_smollm2()
    start = time.monotonic()
    results = {part: run_part(part, model_dir, out / f"part_{part}", args.steps, args.eval_tasks, signals) for part in args.part}
    (out / "results.json").write_text(json.dumps({"steps": args.steps, "results": results}, indent=2))
    plot = save_plot(out, results)
    for part, rows in results.items():
        report(part, rows, args.steps, args.eval_tasks)
    print(f"\ntotal {(time.monotonic() - start) / 60:.1f} min; peak RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    if plot:
        print(f"plot: {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
