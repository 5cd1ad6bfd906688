"""TRL's side of bench/rl_vs_trl.py: GRPOTrainer on the capitals task, run by the TRL virtualenv's python.

    .bench/trl-venv/bin/python bench/trl_grpo_capitals.py TASKS.json MODEL_DIR STEPS OUT.json

Self-contained (TRL's environment has no apprentice): TASKS.json, written by rl_vs_trl.py from
apprentice.demo_rl's environment, holds the train and eval prompts and each task's city pattern; the reward
below is apprentice.demo_rl.score_capital restated (0.5 for the right city + 0.5 for at most 4 words).
Prints one JSON object to OUT.json: held-out greedy reward before and after, and the wall time of every step.
"""

from __future__ import annotations

import json
import re
import sys
import time
from typing import Any

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

MAX_WORDS = 4


def score(text: str, city: str) -> float:
    right = re.search(city, text, re.IGNORECASE) is not None
    short = 0 < len(text.split()) <= MAX_WORDS
    return 0.5 * right + 0.5 * short


def reward(completions: list[Any], city: list[str], **_: Any) -> list[float]:
    return [score(c[0]["content"] if isinstance(c, list) else c, pattern) for c, pattern in zip(completions, city, strict=True)]


def held_out(model: Any, tokenizer: Any, tasks: list[dict[str, Any]], max_tokens: int) -> float:
    """Mean reward of greedy answers (one prompt at a time, as the server's greedy eval decodes each alone)."""
    model.eval()
    total = 0.0
    with torch.no_grad():
        for task in tasks:
            ids = tokenizer.apply_chat_template(task["prompt"], add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)  # fmt: skip
            out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False)
            text = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
            total += score(text, task["city"])
    model.train()
    return total / len(tasks)


class StepClock(TrainerCallback):
    """Wall time of each optimizer step, generation included (GRPOTrainer samples inside its step)."""

    def __init__(self) -> None:
        self.last = 0.0
        self.steps: list[float] = []

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self.last:
            self.last = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        now = time.perf_counter()
        self.steps.append(now - self.last)
        self.last = now


def main(tasks_path: str, model_dir: str, steps: int, out_path: str) -> None:
    tasks = json.loads(open(tasks_path, encoding="utf-8").read())
    settings = tasks["settings"]
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    before = held_out(model, tokenizer, tasks["eval"], settings["max_tokens"])
    print(f"trl: held-out reward before {before:.4f}", flush=True)
    dataset = Dataset.from_list([{"prompt": t["prompt"], "city": t["city"]} for t in tasks["train"]])
    args = GRPOConfig(
        output_dir=tasks["output_dir"], max_steps=steps, learning_rate=settings["lr"], lr_scheduler_type="constant",
        per_device_train_batch_size=settings["prompts"] * settings["samples"], num_generations=settings["samples"],
        max_completion_length=settings["max_tokens"], temperature=1.0, beta=0.0, scale_rewards="none",
        loss_type="dapo", use_vllm=False, bf16=False, use_cpu=True, seed=0, logging_steps=1, report_to="none",
        save_strategy="no", max_grad_norm=1.0, weight_decay=0.0,
    )  # fmt: skip
    clock = StepClock()
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[clock])  # fmt: skip
    trainer.train()
    after = held_out(trainer.model, tokenizer, tasks["eval"], settings["max_tokens"])
    print(f"trl: held-out reward after {after:.4f}", flush=True)
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump({"before": before, "after": after, "step_s": clock.steps}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
