"""Per-family fidelity table: real chat templates x real agent conversations, rendered by render_trajectory.

    HF_HUB_OFFLINE=1 PYTHONPATH=src python bench/render_families.py

For every (family, conversation) pair: "exact" when render_trajectory returns samples that pass the contract
check of tests/unit/render_helpers.py (each turn's inference prompt ids, then its generated ids through the
first end-of-turn token) and equal the naive reference; otherwise the RenderError kind it was set aside with,
or WRONG (a check failed: a silently wrong mask). Cost: render_trajectory time over one apply_chat_template +
one tokenization of the whole conversation. Templates and tokenizers: tests/fixtures/templates/SOURCES.md.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "unit"))

from render_helpers import FAMILIES, FAMILY_EOT, agent_traces, as_trajectory, check_principle, family  # noqa: E402

from apprentice.render import RenderError, render_trajectory  # noqa: E402
from apprentice.render.normalize import normalize_message  # noqa: E402
from apprentice.render.reference import render_reference  # noqa: E402
from apprentice.render.template import ChatRenderer  # noqa: E402


def timed(fn: Any, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    only = sys.argv[1:]
    traces = agent_traces()
    total, exact_total, wrong_total = 0, 0, 0
    print(f"{'family':18} {'exact':>7} {'set aside by kind':40} {'wrong':>5} {'cost':>6}  tokenizer")
    rows = [(name, name, {}) for name in FAMILIES]
    # llama.cpp's copies of these templates close the thought block unless enable_thinking is set; upstream
    # R1/QwQ templates always open it: render both ways.
    rows += [("qwq+thinking", "qwq", {"enable_thinking": True}), ("r1+thinking", "r1-distill-qwen", {"enable_thinking": True})]
    rows += [("qwen3-nothink", "qwen3", {"enable_thinking": False}), ("smollm3-nothink", "smollm3", {"enable_thinking": False})]
    rows += [("gemma4+thinking", "gemma4", {"enable_thinking": True})]
    for name, fam, kwargs in rows:
        if only and fam not in only:
            continue
        note = FAMILIES[fam] + (f"; template kwargs {kwargs}" if kwargs else "")
        tok = family(fam)
        kinds: Counter[str] = Counter()
        exact = wrong = 0
        ratios = []
        for conv in traces:
            trajectory = as_trajectory(conv)
            try:
                samples = render_trajectory(trajectory, tok, template_kwargs=kwargs)
            except RenderError as err:
                kinds[err.kind] += 1
                if "-v" in sys.argv or os.environ.get("VERBOSE"):
                    print(f"   {conv['name']}: {err}")
                continue
            try:
                check_principle(trajectory, tok, samples, FAMILY_EOT[fam], **kwargs)
                assert render_reference(trajectory, tok, template_kwargs=kwargs) == samples, "differs from the naive reference"
                exact += 1
            except AssertionError as err:
                wrong += 1
                print(f"   WRONG {name} / {conv['name']}: {err}")
                continue
            traits = ChatRenderer(tok, trajectory["tools"], kwargs).traits()
            last = trajectory["steps"][-1]
            whole = [normalize_message(m, traits, "") for m in last["prompt"] + last["completion"]]

            def baseline(whole: list = whole, tools: Any = trajectory["tools"], kw: dict = kwargs, tok: Any = tok) -> None:
                text = tok.apply_chat_template(whole, tools=tools, tokenize=False, **kw)
                tok(text, add_special_tokens=False)

            ratios.append(timed(lambda t=trajectory, kw=kwargs, tk=tok: render_trajectory(t, tk, template_kwargs=kw)) / timed(baseline))
        total += len(traces)
        exact_total += exact
        wrong_total += wrong
        aside = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) or "-"
        cost = f"{sum(ratios) / len(ratios):.1f}x" if ratios else "-"
        print(f"{name:18} {exact:>3}/{len(traces):<3} {aside:40} {wrong:>5} {cost:>6}  {note}")
    print(f"all: {exact_total}/{total} exact ({100 * exact_total / max(total, 1):.0f}%), {wrong_total} wrong")


if __name__ == "__main__":
    import os

    main()
