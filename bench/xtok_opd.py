"""Cross-tokenizer on-policy distillation vs off-policy SFT from the same teacher, on a task a tiny model learns on
CPU: the student and the teacher have different tokenizers, templates and end-of-turn tokens.

    HF_HUB_OFFLINE=1 python bench/xtok_opd.py [--output-dir runs/xtok-bench] [--steps 16]

Task: apprentice.testing.letters (reward = share of vowels in the answer; held-out prompts scored greedily).
Teacher: a tiny 2-layer model on a SentencePiece-style byte-fallback tokenizer with a Phi-3-style template
(turns end with <|end|>), first trained with `apprentice rl` on the task (so it is better than the student).
Student: a tiny 2-layer model on a byte-level BPE with ChatML (turns end with <|im_end|>), untrained.
Both built offline (apprentice.testing.tiny_sp). Then, same student, same prompts per step, same steps:
  - off-policy: `apprentice distill`, SFT on the teacher's sampled answers (its text re-tokenized for the student);
  - on-policy:  `apprentice rl` with [orchestrator.teacher_model] on the teacher's own tokenizer: the student samples,
                the teacher scores the text after the conversation in its own template, byte-aligned (crosstok).
Prints a markdown table (held-out reward before/after, wall-clock) and writes OUTPUT/xtok_opd.png (reverse KL
per step) and OUTPUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
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
args = { letters = "aeiou", name = "vowels", num_eval_tasks = 16 }
"""


def config(out: Path, name: str, model: Path, steps: int, body: str) -> Config:
    path = out / f"{name}.toml"
    path.write_text(f'output_dir = "{out / name}"\nseed = 0\n[model]\nname = "{model}"\n{body}\n'
                    f"[trainer]\nmax_steps = {steps}\nmicro_batch_tokens = 2048\n[trainer.optim]\nlr = 3e-2\n"
                    f"[trainer.ckpt]\ninterval = 1000\n{ENV}")  # fmt: skip
    return load_config([path])


def rl_body(extra: str = "") -> str:
    return (f"[inference]\nport = {free_port()}\nthreads = 1\n[orchestrator]\nbatch_size = 16\nrollouts_per_prompt = 4\n"
            f"max_async_level = 0\ntruncated = \"keep\"\n[orchestrator.sampling]\ntemperature = 1.0\nmax_tokens = 16\n"
            f"seed = 0\n{extra}")  # fmt: skip


def timed(fn: Any, cfg: Config) -> float:
    start = time.monotonic()
    if (code := fn(cfg)) != 0:
        sys.exit(f"{fn.__name__} failed with exit code {code}")
    return time.monotonic() - start


def held_out(cfg: Config, model: str) -> float:
    return next(r.reward for r in evaluate(cfg, model) if r.env == "vowels")


def save_plot(out: Path, opd: list[dict[str, float]]) -> Path | None:
    if (plt := pyplot()) is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [m["step"] for m in opd]
    ax.plot(steps, [m["distill/reverse_kl"] for m in opd], marker=".", color="C0")
    ax.set(title="on-policy, teacher on another tokenizer", xlabel="step")
    ax.set_ylabel("reverse KL per token (byte-aligned, nats)", color="C0")
    reward = ax.twinx()
    reward.plot(steps, [m["rollout/reward"] for m in opd], marker=".", color="C1")
    reward.set_ylabel("train reward (vowel share of samples)", color="C1")
    reward.set_ylim(0, 1.05)
    return save_figure(fig, out / "xtok_opd.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/xtok-bench")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--teacher-steps", type=int, default=24)
    args = parser.parse_args(argv)
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    student = save_ascii_student(out / "student_init", seed=0)
    teacher_init = save_tiny_sp_model(out / "teacher_init", seed=1)
    teacher_cfg = config(out, "teacher", teacher_init, args.teacher_steps, rl_body())
    if not (out / "teacher" / "final" / "config.json").is_file():  # a rerun reuses the trained teacher
        print("== training the teacher (byte-fallback tokenizer) with apprentice rl on the task", flush=True)
        timed(run_rl, teacher_cfg)
    teacher_dir = out / "teacher" / "final"
    eval_cfg = config(out, "eval", student, 1, rl_body())  # held-out tasks, greedy (orchestrator.eval_temperature)
    serve_args = ["--served-model-name", "teacher", "--threads", "1"]
    with local_server(teacher_dir, extra_args=serve_args, log_path=out / "teacher_server.log") as url:
        rows = {"teacher (trained, byte-fallback tokenizer)": held_out(eval_cfg, str(teacher_dir)),
                "student, untrained (byte-level BPE)": held_out(eval_cfg, str(student))}  # fmt: skip
        sft_cfg = config(out, "sft", student, args.steps, (
            "[orchestrator]\nbatch_size = 16\nrollouts_per_prompt = 1\nuse_token_client = false\ntruncated = \"keep\"\n"
            f"[orchestrator.rollout_model]\nbase_url = \"{url}\"\nmodel = \"teacher\"\n"
            "[orchestrator.sampling]\ntemperature = 1.0\nmax_tokens = 16\n[trainer.loss]\ntype = \"sft\"\n"))  # fmt: skip
        opd_cfg = config(out, "opd", student, args.steps, rl_body(
            f"[orchestrator.teacher_model]\nbase_url = \"{url}\"\nmodel = \"teacher\"\ntokenizer = \"{teacher_dir}\"\n"
            "[trainer.loss]\ntype = \"rl\"\n"))  # fmt: skip
        print("== off-policy: SFT on the teacher's answers", flush=True)
        sft_s = timed(run_distill, sft_cfg)
        print("== on-policy: the student samples, the teacher (another tokenizer) scores its text", flush=True)
        opd_s = timed(run_rl, opd_cfg)
    rows["student, off-policy SFT"] = held_out(eval_cfg, str(out / "sft" / "final"))
    rows["student, on-policy cross-tokenizer"] = held_out(eval_cfg, str(out / "opd" / "final"))
    clock = {"student, off-policy SFT": sft_s, "student, on-policy cross-tokenizer": opd_s}
    opd = [m for m in read_metrics(out / "opd" / "orchestrator" / "metrics.jsonl") if "distill/reverse_kl" in m]
    set_aside: dict[str, float] = {}
    for m in opd:
        for k, v in m.items():
            if k.startswith("distill/set_aside/"):
                set_aside[k] = set_aside.get(k, 0.0) + v
    results = {"steps": args.steps, "held_out_reward": rows, "train_wall_s": clock,
               "reverse_kl": [m["distill/reverse_kl"] for m in opd], "set_aside": set_aside,
               "scored_samples": sum(m["distill/scored_samples"] for m in opd)}  # fmt: skip
    (out / "results.json").write_text(json.dumps(results, indent=2))
    if (plot := save_plot(out, opd)) is not None:
        print(f"plot: {plot}")
    print(f"\nheld-out prompts (16), greedy; {args.steps} steps of 16 samples; 2-core CPU")
    print("| model | held-out reward (vowel share) | training wall-clock |")
    print("|---|---|---|")
    for name, reward in rows.items():
        print(f"| {name} | {reward:.3f} | {f'{clock[name] / 60:.1f} min' if name in clock else '-'} |")
    print(f"reverse KL per step: {[round(x, 3) for x in results['reverse_kl']]}; set aside: {set_aside}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
