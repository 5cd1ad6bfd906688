"""Off-policy (SFT on the teacher's answers) vs on-policy distillation (the student samples, the teacher scores its
tokens) on the demo's capitals task: same teacher, same student, same prompts per step, same number of steps.

    HF_HUB_OFFLINE=1 python bench/opd_vs_sft.py [--output-dir runs/opd-bench] [--steps 50]

The teacher is SmolLM2-135M-Instruct with hidden instructions and worked examples (configs/demo/teacher_prompt.json)
served by `apprentice serve`; the student is the same model without them. Off-policy: `apprentice distill
configs/demo/distill-capitals.toml` (the README demo). On-policy: `apprentice rl configs/demo/opd-capitals.toml`
(per-token advantage = teacher logprob - student logprob, the rl loss). Both finals and the untrained student are
scored on the 40 held-out countries with greedy decoding; wall-clock is the training run alone (launch to exit).
Prints a markdown table and writes OUTPUT/opd_vs_sft.png and OUTPUT/results.json. Rerunning resumes both runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from apprentice.config import load_config
from apprentice.demo import CONFIG as SFT_CONFIG
from apprentice.demo import FORMAT_ENV, TEACHER_PROMPT, Scores, score
from apprentice.inference.launch import free_port, local_server
from apprentice.launcher import run_distill
from apprentice.launcher_rl import run_rl
from apprentice.metrics import read_metrics
from apprentice.plotting import pyplot, save_figure
from apprentice.testing.smollm2 import export_smollm2

OPD_CONFIG = Path("configs/demo/opd-capitals.toml")


def timed(fn: Any, *args: Any) -> float:
    start = time.monotonic()
    code = fn(*args)
    if code != 0:
        sys.exit(f"{fn.__name__} failed with exit code {code}")
    return time.monotonic() - start


def save_plot(out: Path, sft_dir: Path, opd_dir: Path, rows: dict[str, Scores]) -> Path | None:
    if (plt := pyplot()) is None:
        return None
    sft = read_metrics(sft_dir / "trainer" / "metrics.jsonl")
    opd = [m for m in read_metrics(opd_dir / "orchestrator" / "metrics.jsonl") if "distill/reverse_kl" in m]
    fig, (ax_curve, ax_bars) = plt.subplots(1, 2, figsize=(12, 4))
    ax_curve.plot([m["step"] for m in sft], [m["loss/nll"] for m in sft], marker=".", label="off-policy: SFT loss (NLL of teacher answers)")
    ax_curve.plot([m["step"] for m in opd], [m["distill/reverse_kl"] for m in opd], marker=".",
                  label="on-policy: reverse KL on student samples")  # fmt: skip
    ax_curve.plot([m["step"] for m in opd], [m["rollout/reward"] for m in opd], marker=".", color="gray", alpha=0.6,
                  label="on-policy: reward of student samples (train)")  # fmt: skip
    ax_curve.set(title="training signal per step", xlabel="step")
    ax_curve.legend(fontsize=8)
    names = list(rows)
    xs = range(len(names))
    ax_bars.bar([x - 0.2 for x in xs], [rows[n].correct for n in names], width=0.4, label="right city, alone")
    ax_bars.bar([x + 0.2 for x in xs], [rows[n].form for n in names], width=0.4, label="bare city name")
    ax_bars.set_xticks(list(xs), names, rotation=15, fontsize=8)
    ax_bars.set(title="held-out countries (40), greedy", ylim=(0, 1.05))
    ax_bars.legend(fontsize=8)
    return save_figure(fig, out / "opd_vs_sft.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/opd-bench")
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = export_smollm2()
    sft_dir, opd_dir = out / "sft", out / "opd"
    teacher_args = ["--prompt-prefix-file", str(TEACHER_PROMPT), "--threads", "1", "--served-model-name", "teacher"]
    with local_server(model_dir, extra_args=teacher_args, log_path=out / "teacher_server.log") as teacher_url:
        common = ["--model.name", str(model_dir), "--trainer.max_steps", str(args.steps)]
        sft_cfg = load_config([SFT_CONFIG], [*common, "--output_dir", str(sft_dir), "--orchestrator.rollout_model.base_url", teacher_url])
        opd_cfg = load_config([OPD_CONFIG], [*common, "--output_dir", str(opd_dir), "--orchestrator.teacher_model.base_url",
                                             teacher_url, "--inference.port", str(free_port())])  # fmt: skip
        eval_cfg = load_config([SFT_CONFIG], [*common, "--output_dir", str(out / "eval"), "--orchestrator.rollout_model.base_url",
                                              teacher_url, "--orchestrator.sampling.temperature", "0"])  # fmt: skip
        eval_cfg.orchestrator.env = [*eval_cfg.orchestrator.env, FORMAT_ENV]
        print(f"== teacher at {teacher_url}; scoring teacher and untrained student on held-out countries", flush=True)
        rows = {"teacher (hidden prompt)": score(eval_cfg, teacher_url), "student, untrained": score(eval_cfg, str(model_dir))}
        print("== off-policy distillation (SFT on teacher answers)", flush=True)
        sft_s = timed(run_distill, sft_cfg)
        print("== on-policy distillation (student samples, teacher scores every token)", flush=True)
        opd_s = timed(run_rl, opd_cfg)
    rows["student, off-policy SFT"] = score(eval_cfg, str(sft_dir / "final"))
    rows["student, on-policy"] = score(eval_cfg, str(opd_dir / "final"))
    clock = {"student, off-policy SFT": sft_s, "student, on-policy": opd_s}
    results = {name: {"correct": s.correct, "form": s.form, "train_wall_s": clock.get(name)} for name, s in rows.items()}
    (out / "results.json").write_text(json.dumps({"steps": args.steps, "results": results}, indent=2))
    plot = save_plot(out, sft_dir, opd_dir, rows)
    print(f"\nheld-out countries (40), greedy decoding; {args.steps} steps of 8 prompts each; 2-core CPU")
    print("| model | reward: right city, alone | bare city name | training wall-clock |")
    print("|---|---|---|---|")
    for name, s in rows.items():
        wall = f"{clock[name] / 60:.1f} min" if name in clock else "-"
        print(f"| {name} | {s.correct:.3f} | {s.form:.3f} | {wall} |")
    if plot:
        print(f"plot: {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
