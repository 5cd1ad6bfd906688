"""Cost of render_trajectory on a long agentic conversation, as a multiple of one render + one tokenization.

    HF_HUB_OFFLINE=1 python bench/render.py [--turns 200] [--tokenizer tiny|smollm2|qwen2.5|llama3.2] [--repeats 3]

The conversation has `--turns` assistant turns (each a tool call followed by its tool result), all in one
trajectory whose steps each repeat the conversation so far as their prompt (as environments produce them).
Baseline, measured in the same run: `apply_chat_template` over the whole conversation plus one tokenization of
that text with offsets. Also times the naive approach (render and tokenize every prefix: render/reference.py).
The acceptance bar (DESIGN.md section 4) is under 40x.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

from apprentice.render import render_trajectory
from apprentice.render.reference import render_reference

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "calculator",
            "description": "Evaluate an arithmetic expression.",
            "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}},
        },
    }
]


def long_trajectory(turns: int, tool_calls: bool = True) -> dict[str, Any]:
    """`turns` assistant turns; each followed by a tool result, or (tool_calls=False) by a user message."""
    conversation: list[dict[str, Any]] = [
        {"role": "system", "content": "You are a careful assistant. Use the calculator for arithmetic."},
        {"role": "user", "content": "Add up the first numbers, one step at a time, and tell me the total."},
    ]
    steps = []
    for i in range(turns):
        call = {"id": f"call_{i}", "type": "function", "function": {"name": "calculator"}}
        call["function"]["arguments"] = json.dumps({"expression": f"{i * (i + 1) // 2} + {i + 1}"})
        assistant: dict[str, Any] = {"role": "assistant", "content": f"Step {i}: adding {i + 1} to the running total."}
        result = str((i + 1) * (i + 2) // 2)
        if tool_calls:
            assistant["tool_calls"] = [call]
            env = {"role": "tool", "tool_call_id": f"call_{i}", "content": result}
        else:
            env = {"role": "user", "content": f"The total is now {result}. Go on."}
        steps.append({"prompt": list(conversation), "completion": [assistant]})
        conversation += [assistant, env]
    return {"steps": steps, "tools": TOOLS if tool_calls else None}


def best_of(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm caches (compiled template, tokenizer)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def load_tokenizer(name: str) -> Any:
    if name in ("qwen2.5", "llama3.2"):  # real tokenizers + real templates (tests/fixtures, see SOURCES.md there)
        import sys
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "unit"))
        from render_helpers import family

        return family(name)
    if name == "smollm2":
        from transformers import AutoTokenizer

        from apprentice.testing.smollm2 import export_smollm2

        return AutoTokenizer.from_pretrained(export_smollm2())
    from apprentice.testing.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--tokenizer", choices=["tiny", "smollm2", "qwen2.5", "llama3.2"], default="tiny")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-naive", action="store_true")
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.tokenizer)
    # SmolLM2's template does not render tool calls and Llama 3's drops text beside a call (render would set such
    # turns aside): use user turns there.
    trajectory = long_trajectory(args.turns, tool_calls=args.tokenizer not in ("smollm2", "llama3.2"))
    last = trajectory["steps"][-1]
    whole = last["prompt"] + last["completion"]

    def baseline() -> None:
        text = tokenizer.apply_chat_template(whole, tools=trajectory["tools"], tokenize=False)
        tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)

    samples = render_trajectory(trajectory, tokenizer)
    t_base = best_of(baseline, args.repeats)
    t_fast = best_of(lambda: render_trajectory(trajectory, tokenizer), args.repeats)
    print(f"tokenizer={args.tokenizer} assistant_turns={args.turns} messages={len(whole)} samples={len(samples)}")
    print(f"tokens={len(samples[-1])} loss_tokens={samples[-1].num_loss_tokens}")
    print(f"baseline (1 render + 1 tokenization): {t_base * 1e3:.1f} ms")
    print(f"render_trajectory: {t_fast * 1e3:.1f} ms = {t_fast / t_base:.1f}x baseline (must be < 40x)")
    if not args.skip_naive:
        t_naive = best_of(lambda: render_reference(trajectory, tokenizer), 1)
        assert render_reference(trajectory, tokenizer) == samples, "fast and naive renderings differ"
        print(f"naive per-prefix render+tokenize: {t_naive * 1e3:.1f} ms = {t_naive / t_base:.1f}x baseline")


if __name__ == "__main__":
    main()
