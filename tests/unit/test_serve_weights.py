"""Which directories `POST /v1/load_weights` accepts before loading anything (handoff/weights.py `verify`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from apprentice.handoff.paths import MARKER
from apprentice.handoff.weights import WeightsError, verify


def hf_dir(path: Path, files: dict[str, str]) -> Path:
    path.mkdir(parents=True)
    for name, text in {"config.json": "{}", **files}.items():
        (path / name).write_text(text)
    return path


def test_sharded_weights_need_every_shard_their_index_names(tmp_path: Path) -> None:
    index = json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})
    d = hf_dir(tmp_path / "sharded", {"model.safetensors.index.json": index, "model-00001-of-00002.safetensors": "x"})
    with pytest.raises(WeightsError, match="missing model-00002-of-00002.safetensors"):
        verify(d)
    (d / "model-00002-of-00002.safetensors").write_text("x")
    verify(d)
    (d / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(WeightsError, match="not a valid weight index"):
        verify(d)


def test_trainer_step_dirs_need_their_marker_and_plain_dirs_need_weights(tmp_path: Path) -> None:
    step = hf_dir(tmp_path / "weights" / "step_7", {"model.safetensors": "x"})
    with pytest.raises(WeightsError, match=MARKER):
        verify(step)
    (step / MARKER).write_text("{}")
    verify(step)
    verify(hf_dir(tmp_path / "exported", {"model.safetensors": "x"}))  # no marker needed elsewhere
    with pytest.raises(WeightsError, match="has no weights"):
        verify(hf_dir(tmp_path / "empty", {}))
    with pytest.raises(WeightsError, match="does not exist"):
        verify(tmp_path / "nope")
