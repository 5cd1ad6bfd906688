"""Cross-tokenizer on-policy distillation vs off-policy SFT from the same teacher, on a task a tiny model learns on
CPU: the student and the teacher have different tokenizers, templates and end-of-turn tokens.

    HF_HUB_OFFLINE=1 python bench/xtok_opd.py [--pair bytefallback|wide] [--seeds 0 1] [--steps 16]
        [--spreads even last first surprisal] [--teacher-side endpoint|local] [--no-sft] [--output-dir DIR]

Task: apprentice.testing.letters (reward = share of vowels in the answer; 64 held-out prompts, one answer each
sampled at temperature 1 with a fixed seed, before, during (every --eval-interval steps) and after training).
Pairs (both built offline, apprentice.testing.tiny_sp; tiny 2-layer models):
  bytefallback  teacher: SentencePiece-style BPE with byte fallback (600 pieces), Phi-3-style template (<|end|>);
                student: byte-level BPE of ASCII (400), ChatML (<|im_end|>). The tokenizations mostly agree
                (1 to 3 student tokens in 100 sit in a chunk of several student tokens).
  wide          teacher: the same kind of tokenizer with 2,000 pieces, its merges trained on letter sequences too
                (as a large vocabulary's cover a language); student: ASCII characters only (90 tokens), ChatML.
                Most teacher tokens cover several student tokens: the regime where the spread rule matters.
The teacher is first trained with `apprentice rl` on the task (so it is better than the student). Then, per seed
(the student's initialisation and the sampling/data seed), the same student, same prompts per step, same steps:
  - off-policy: `apprentice distill`, SFT on the teacher's sampled answers (its text re-tokenized for the student);
  - on-policy:  `apprentice rl` with [orchestrator.teacher_model], one run per `--spreads` rule: the student
                samples, the teacher scores the text after the conversation in its own template, aligned by bytes.
`--teacher-side endpoint` (default) builds the teacher's side over the served teacher's POST /tokenize (what
`apprentice serve` answers); `local` from its tokenizer directory (use_endpoint_tokenize = false).
Prints a markdown table (held-out reward: mean and per seed; final reverse KL; share of student tokens in
multi-token chunks; wall-clock; load average) and writes OUTPUT/<pair>/xtok_opd-<side>.png (held-out reward
and reverse KL per step) and OUTPUT/<pair>/results-<side>.json. A rerun reuses the trained teacher and every finished run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from statistics import mean
from typing import Any

from apprentice.config import Config, load_config
from apprentice.eval import evaluate
from apprentice.inference.launch import free_port, local_server
from apprentice.launcher import run_distill
from apprentice.launcher_rl import run_rl
from apprentice.metrics import read_metrics
from apprentice.plotting import pyplot, save_figure
from apprentice.testing.tiny_sp import save_ascii_student, save_tiny_sp_model

ENV = """
[[orchestrator.env]]
id = "apprentice.testing.letters:make_letters_env"
args = { letters = "aeiou", name = "vowels", num_eval_tasks = 64 }
"""

PAIRS: dict[str, tuple[Callable[[Path], Path], Callable[[Path, int], Path]]] = {
    "bytefallback": (lambda p: save_tiny_sp_model(p, seed=1), lambda p, seed: save_ascii_student(p, seed=seed)),
    "wide": (lambda p: save_tiny_sp_model(p, seed=1, vocab_size=2000, words=1000),
             lambda p, seed: save_ascii_student(p, seed=seed, vocab_size=1)),
}  # fmt: skip
"""name -> (teacher builder, student builder(path, seed))."""


def config(out: Path, name: str, model: Path, steps: int, body: str, seed: int = 0) -> Config:
    path = out / f"{name}.toml"
    path.write_text(f'output_dir = "{out / name}"\nseed = {seed}\n[model]\nname = "{model}"\n{body}\n'
                    f"[trainer]\nmax_steps = {steps}\nmicro_batch_tokens = 2048\n[trainer.optim]\nlr = 3e-2\n"
                    f"[trainer.ckpt]\ninterval = 1000\n{ENV}")  # fmt: skip
    return load_config([path])


def rl_body(extra: str = "", seed: int = 0, eval_interval: int = 0) -> str:
    return (f"[inference]\nport = {free_port()}\nthreads = 1\n[orchestrator]\nbatch_size = 16\nrollouts_per_prompt = 4\n"
            f"max_async_level = 0\ntruncated = \"keep\"\neval_interval = {eval_interval}\neval_temperature = 1.0\n"
            f"[orchestrator.sampling]\n"
            f"temperature = 1.0\nmax_tokens = 16\nseed = {seed}\n{extra}")  # fmt: skip


def timed(fn: Any, cfg: Config) -> float:
    start = time.monotonic()
    if (code := fn(cfg)) != 0:
        sys.exit(f"{fn.__name__} failed with exit code {code}")
    return time.monotonic() - start


def run_once(fn: Any, cfg: Config, eval_cfg: Config) -> tuple[float, float]:
    """(held-out reward of the run's final model, training wall-clock s); a rerun of the bench reuses a finished
    run's (OUTPUT/.../<run>/bench.json) instead of training again."""
    done = Path(cfg.output_dir) / "bench.json"
    if done.is_file():
        print(f"   (reusing {done})", flush=True)
        saved = json.loads(done.read_text())
        return saved["held_out"], saved["wall_s"]
    wall = timed(fn, cfg)
    reward = held_out(eval_cfg, str(Path(cfg.output_dir) / "final"))
    done.write_text(json.dumps({"held_out": reward, "wall_s": wall}))
    return reward, wall


def held_out(cfg: Config, model: str) -> float:
    """Mean reward on the 64 held-out prompts, one answer each sampled at temperature 1 with a fixed seed (the
    distribution the student is trained to match; a tiny model's greedy answer is one string repeated)."""
    return next(r.reward for r in evaluate(cfg, model) if r.env == "vowels")


def opd_record(run: Path, reward: float, wall_s: float) -> dict[str, Any]:
    """What one on-policy run measured, from its orchestrator metrics."""
    steps = read_metrics(run / "orchestrator" / "metrics.jsonl")
    train = [m for m in steps if "distill/reverse_kl" in m]
    # In-run evaluations, by the number of steps the evaluated policy was trained for.
    evals = [(int(m["policy/step"]), m["eval/vowels/reward"]) for m in read_metrics(run / "orchestrator" / "eval.jsonl")]
    set_aside: dict[str, float] = {}
    for m in train:
        for k, v in m.items():
            if k.startswith("distill/set_aside/"):
                set_aside[k] = set_aside.get(k, 0.0) + v
    tokens = sum(m["distill/scored_tokens"] for m in train)
    multi = sum(m.get("distill/multi_token_chunks", 0.0) * m["distill/scored_tokens"] for m in train)
    return {"held_out": reward, "wall_s": wall_s, "reverse_kl": [m["distill/reverse_kl"] for m in train],
            "train_reward": [m["rollout/reward"] for m in train], "eval": evals, "set_aside": set_aside,
            "multi_token_chunks": multi / tokens if tokens else 0.0,
            "tokenize_requests": sum(m.get("distill/tokenize/requests", 0.0) for m in train),
            "scoring_requests": sum(m.get("distill/requests", 0.0) for m in train)}  # fmt: skip


def save_plot(path: Path, title: str, runs: dict[str, list[dict[str, Any]]], lines: dict[str, float]) -> Path | None:
    """Held-out reward per step (on-policy runs; SFT, teacher and untrained student as lines) and reverse KL."""
    if (plt := pyplot()) is None:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, records) in enumerate(runs.items()):  # each seed thin, the mean over seeds bold
        for r in records:
            left.plot(*zip(*r["eval"], strict=True), color=f"C{i}", alpha=0.3, linewidth=1)
            right.plot(range(1, len(r["reverse_kl"]) + 1), r["reverse_kl"], color=f"C{i}", alpha=0.3, linewidth=1)
        steps = [s for s, _ in records[0]["eval"]]
        left.plot(steps, [mean(r["eval"][k][1] for r in records) for k in range(len(steps))], marker="o", color=f"C{i}",
                  linewidth=2.5, label=f"{name} (mean of {len(records)})")  # fmt: skip
        kl = [mean(r["reverse_kl"][k] for r in records) for k in range(min(len(r["reverse_kl"]) for r in records))]
        right.plot(range(1, len(kl) + 1), kl, color=f"C{i}", linewidth=2.5, label=name)
    for k, (name, value) in enumerate(lines.items()):
        left.axhline(value, color="0.5", linestyle=("--", ":", "-.")[k % 3], label=name)
    left.set(title=f"held-out reward (64 prompts, T=1); {title}", xlabel="training steps", ylabel="vowel share", ylim=(0, 1.05))
    right.set(title="reverse KL per student token (byte-aligned)", xlabel="step", ylabel="nats", yscale="log")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/xtok-bench")
    parser.add_argument("--pair", choices=sorted(PAIRS), default="bytefallback")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--spreads", nargs="+", default=["even"], choices=["even", "last", "first", "surprisal"])
    parser.add_argument("--teacher-side", choices=["endpoint", "local"], default="endpoint")
    parser.add_argument("--no-sft", action="store_true", help="on-policy runs only")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--teacher-steps", type=int, default=24)
    parser.add_argument("--eval-interval", type=int, default=4)
    args = parser.parse_args(argv)
    out = Path(args.output_dir).resolve() / args.pair
    out.mkdir(parents=True, exist_ok=True)
    started, load_start = time.monotonic(), os.getloadavg()[0]
    build_teacher, build_student = PAIRS[args.pair]
    teacher_init = build_teacher(out / "teacher_init")
    teacher_cfg = config(out, "teacher", teacher_init, args.teacher_steps, rl_body())
    if not (out / "teacher" / "final" / "config.json").is_file():  # a rerun reuses the trained teacher
        print("== training the teacher with apprentice rl on the task", flush=True)
        timed(run_rl, teacher_cfg)
    teacher_dir = out / "teacher" / "final"
    side = "" if args.teacher_side == "endpoint" else f'tokenizer = "{teacher_dir}"\nuse_endpoint_tokenize = false\n'
    lines: dict[str, float] = {}
    runs: dict[str, list[dict[str, Any]]] = {}
    untrained: list[float] = []
    serve_args = ["--served-model-name", "teacher", "--threads", "1"]
    with local_server(teacher_dir, extra_args=serve_args, log_path=out / "teacher_server.log") as url:
        for seed in args.seeds:
            base = out / f"seed{seed}"
            base.mkdir(exist_ok=True)
            student = build_student(base / "student_init", seed)
            eval_cfg = config(base, "eval", student, 1, rl_body())  # held-out tasks, T=1, seed 0
            if not lines:
                lines["teacher"] = held_out(eval_cfg, str(teacher_dir))
            untrained.append(held_out(eval_cfg, str(student)))
            if not args.no_sft:
                sft_cfg = config(base, "sft", student, args.steps, seed=seed, body=(
                    "[orchestrator]\nbatch_size = 16\nrollouts_per_prompt = 1\nuse_token_client = false\n"
                    f"truncated = \"keep\"\n[orchestrator.rollout_model]\nbase_url = \"{url}\"\nmodel = \"teacher\"\n"
                    "[orchestrator.sampling]\ntemperature = 1.0\nmax_tokens = 16\n[trainer.loss]\ntype = \"sft\"\n"))  # fmt: skip
                print(f"== seed {seed}: off-policy SFT on the teacher's answers", flush=True)
                reward, wall = run_once(run_distill, sft_cfg, eval_cfg)
                runs.setdefault("off-policy SFT", []).append({"held_out": reward, "wall_s": wall})
            for spread in args.spreads:
                name = f"opd-{spread}-{args.teacher_side}"
                opd_cfg = config(base, name, student, args.steps, seed=seed, body=rl_body(
                    f"[orchestrator.teacher_model]\nbase_url = \"{url}\"\nmodel = \"teacher\"\nspread = \"{spread}\"\n"
                    f"{side}[trainer.loss]\ntype = \"rl\"\n", seed=seed, eval_interval=args.eval_interval))  # fmt: skip
                print(f"== seed {seed}: on-policy, spread {spread}, teacher side over the {args.teacher_side}", flush=True)
                record = opd_record(base / name, *run_once(run_rl, opd_cfg, eval_cfg))
                runs.setdefault(f"on-policy, spread={spread}", []).append(record)
    lines["student, untrained (mean)"] = mean(untrained)
    if sft := runs.get("off-policy SFT"):
        lines["off-policy SFT (mean)"] = mean(r["held_out"] for r in sft)
    load_end, total_s = os.getloadavg()[0], time.monotonic() - started
    results = {"pair": args.pair, "steps": args.steps, "seeds": args.seeds, "teacher_side": args.teacher_side,
               "teacher": lines["teacher"], "untrained": untrained, "runs": runs,
               "load_average_1min": [load_start, load_end], "total_wall_s": total_s}  # fmt: skip
    (out / f"results-{args.teacher_side}.json").write_text(json.dumps(results, indent=2))
    opd = {k: v for k, v in runs.items() if k.startswith("on-policy")}
    if opd and (plot := save_plot(out / f"xtok_opd-{args.teacher_side}.png", f"pair {args.pair}", opd, lines)) is not None:
        print(f"plot: {plot}")
    print(f"\npair {args.pair}; {args.steps} steps of 16 samples; seeds {args.seeds}; teacher side over the "
          f"{args.teacher_side}; 2-core CPU, load average {load_start:.1f} -> {load_end:.1f}; {total_s / 60:.1f} min")
    print("| model | held-out reward, mean | per seed | final reverse KL | multi-token chunks | wall-clock |")
    print("|---|---|---|---|---|---|")
    print(f"| teacher (trained) | {lines['teacher']:.3f} | - | - | - | - |")
    print(f"| student, untrained | {mean(untrained):.3f} | {' / '.join(f'{x:.3f}' for x in untrained)} | - | - | - |")
    for name, records in runs.items():
        kl = f"{mean(r['reverse_kl'][-1] for r in records):.2f}" if "reverse_kl" in records[0] else "-"
        multi = f"{mean(r['multi_token_chunks'] for r in records):.2f}" if "reverse_kl" in records[0] else "-"
        per_seed = " / ".join(f"{r['held_out']:.3f}" for r in records)
        print(f"| student, {name} | {mean(r['held_out'] for r in records):.3f} | {per_seed} | {kl} | {multi} | "
              f"{mean(r['wall_s'] for r in records) / 60:.1f} min |")  # fmt: skip
    for name, records in opd.items():
        print(f"{name}: set aside {[r['set_aside'] for r in records]}; /tokenize requests "
              f"{[r['tokenize_requests'] for r in records]}; scoring requests {[r['scoring_requests'] for r in records]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
