"""Weight publishing of rl mode: OUTPUT/weights/step_{n} is a complete, loadable HF directory; old ones pruned."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from apprentice.testing.tiny import build_tiny_model, build_tiny_tokenizer
from apprentice.trainer.publish import (
    MARKER,
    latest_published,
    publish_weights,
    published_steps,
    remove_weights_after,
    weights_dir,
)


def test_publish_writes_loadable_weights_and_keeps_the_newest(tmp_path: Path) -> None:
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(len(tokenizer), seed=1)
    assert latest_published(tmp_path) == 0
    (tmp_path / "weights" / ".step_9.tmp-x").mkdir(parents=True)  # a write interrupted by a kill
    (tmp_path / "weights" / "step_7").mkdir()  # no marker: never counted as published
    for step in (1, 2, 3):
        with torch.no_grad():
            model.model.embed_tokens.weight.add_(1.0)
        assert publish_weights(model, tokenizer, tmp_path, step, keep=2) == weights_dir(tmp_path, step)
    assert published_steps(tmp_path) == [2, 3] and latest_published(tmp_path) == 3
    assert not (tmp_path / "weights" / "step_1").exists() and not list((tmp_path / "weights").glob(".step_*"))
    assert (weights_dir(tmp_path, 3) / MARKER).is_file()
    loaded = AutoModelForCausalLM.from_pretrained(weights_dir(tmp_path, 3))
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert (weights_dir(tmp_path, 3) / "tokenizer_config.json").is_file()

    assert remove_weights_after(tmp_path, 2) == [3]
    assert published_steps(tmp_path) == [2]
