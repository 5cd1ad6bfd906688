"""Weight publishing of rl mode: OUTPUT/weights/step_{n} is a complete, loadable HF directory; old ones pruned."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from apprentice.handoff.paths import MANIFEST, MARKER
from apprentice.handoff.weights import (
    DamagedWeightsError,
    latest_published,
    latest_verified,
    publish,
    published_steps,
    remove_after,
    verify,
    weights_dir,
)
from apprentice.testing.tiny import build_tiny_model, build_tiny_tokenizer


def test_publish_writes_loadable_weights_and_keeps_the_newest(tmp_path: Path) -> None:
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(len(tokenizer), seed=1)
    assert latest_published(tmp_path) == 0
    (tmp_path / "weights" / ".step_9.tmp-x").mkdir(parents=True)  # a write interrupted by a kill
    (tmp_path / "weights" / "step_7").mkdir()  # no marker: never counted as published
    for step in (1, 2, 3):
        with torch.no_grad():
            model.model.embed_tokens.weight.add_(1.0)
        assert publish(model, tokenizer, tmp_path, step, keep=2) == weights_dir(tmp_path, step)
    assert published_steps(tmp_path) == [2, 3] and latest_published(tmp_path) == 3
    assert not (tmp_path / "weights" / "step_1").exists() and not list((tmp_path / "weights").glob(".step_*"))
    assert (weights_dir(tmp_path, 3) / MARKER).is_file() and (weights_dir(tmp_path, 3) / MANIFEST).is_file()
    verify(weights_dir(tmp_path, 3))
    loaded = AutoModelForCausalLM.from_pretrained(weights_dir(tmp_path, 3))
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert (weights_dir(tmp_path, 3) / "tokenizer_config.json").is_file()

    assert remove_after(tmp_path, 2) == [3]
    assert published_steps(tmp_path) == [2]


def truncate(path: Path) -> None:
    """Half of model.safetensors is gone; COMPLETE and the manifest are kept (a disk that filled up)."""
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def overwrite_8k(path: Path) -> None:
    """8 KB of 0xFF in the middle of model.safetensors: same size, so only the checksum can tell."""
    weights = path / "model.safetensors"
    with open(weights, "r+b") as f:
        f.seek(weights.stat().st_size // 2)
        f.write(b"\xff" * 8192)


def remove_tokenizer(path: Path) -> None:
    (path / "tokenizer_config.json").unlink()


@pytest.mark.parametrize(
    ("damage", "problem"),
    [(truncate, "the manifest says"), (overwrite_8k, "model.safetensors: sha256 mismatch"),
     (remove_tokenizer, "tokenizer_config.json: missing")],  # fmt: skip
)
def test_damaged_published_weights_are_named_in_one_line_and_set_aside(
    tmp_path: Path, damage: Callable[[Path], None], problem: str
) -> None:
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(len(tokenizer), seed=1)
    for step in (2, 3):
        publish(model, tokenizer, tmp_path, step, keep=3)
    path = weights_dir(tmp_path, 3)
    size = (path / "model.safetensors").stat().st_size
    damage(path)
    assert (path / MARKER).is_file()
    if damage is overwrite_8k:
        assert (path / "model.safetensors").stat().st_size == size
    with pytest.raises(DamagedWeightsError) as err:
        verify(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and problem in message and "moved aside to step_3.damaged-" in message
    (aside,) = (tmp_path / "weights").glob("step_3.damaged-*")
    assert (aside / MARKER).is_file() and not path.exists()  # kept for inspection, no longer complete weights
    assert published_steps(tmp_path) == [2] and latest_verified(tmp_path) == 2


def test_latest_verified_skips_damaged_weights_and_reports_each(tmp_path: Path) -> None:
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(len(tokenizer), seed=1)
    for step in (1, 2):
        publish(model, tokenizer, tmp_path, step, keep=3)
    overwrite_8k(weights_dir(tmp_path, 2))
    reports: list[str] = []
    assert latest_verified(tmp_path, report=reports.append) == 1
    assert len(reports) == 1 and str(weights_dir(tmp_path, 2)) in reports[0]
