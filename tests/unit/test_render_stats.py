"""RenderStats and render_many: what the orchestrator logs under render/ each step."""

from __future__ import annotations

import pytest

from apprentice.render import RenderError, RenderStats, render_many
from apprentice.testing.tiny import build_tiny_tokenizer
from apprentice.types import TrainingSample

USER = {"role": "user", "content": "hi"}


def answer(content: str) -> dict:
    return {"steps": [{"prompt": [USER], "completion": [{"role": "assistant", "content": content}]}]}


def test_render_many_counts_and_sets_aside_without_raising() -> None:
    tok = build_tiny_tokenizer()
    batch = [
        answer("hello"),
        answer("a<|im_end|>b"),  # control_token
        {"steps": [{"prompt": [USER], "completion": [USER]}]},  # not_assistant
        answer("bye"),
    ]
    samples, stats = render_many(batch, tok)
    metrics = stats.metrics()
    assert len(samples) == 2
    assert metrics["render/trajectories"] == 2.0 and metrics["render/samples"] == 2.0
    assert metrics["render/set_aside"] == 2.0
    assert metrics["render/set_aside/control_token"] == 1.0 and metrics["render/set_aside/not_assistant"] == 1.0
    fractions = [s.num_loss_tokens / len(s) for s in samples]
    assert metrics["render/masked_fraction"] == pytest.approx(sum(fractions) / 2)
    assert metrics["render/all_false_masks"] == 0.0


def test_all_false_masks_are_counted_and_stats_merge() -> None:
    stats = RenderStats()
    stats.add([TrainingSample([1, 2], [False, False], [0.0, 0.0]), TrainingSample([1, 2], [False, True], [0.0, 0.0])])
    other = RenderStats()
    other.add_error(RenderError("template_error", "step 0: boom"))
    stats.merge(other)
    metrics = stats.metrics()
    assert metrics["render/all_false_masks"] == 1.0
    assert metrics["render/masked_fraction"] == 0.25
    assert metrics["render/samples_per_trajectory"] == 2.0
    assert metrics["render/set_aside/template_error"] == 1.0
    assert all(key.startswith("render/") for key in metrics)


def test_unknown_error_kinds_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown RenderError kind"):
        RenderError("oops", "x")
