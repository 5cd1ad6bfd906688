"""One model loader for the trainer and `apprentice serve`: same weights, dtype rule and options."""

from __future__ import annotations

from pathlib import Path

import torch

from apprentice.config import ModelConfig
from apprentice.inference.server import load_model as serve_load_model
from apprentice.loader import resolve_dtype
from apprentice.testing.tiny import save_tiny_student
from apprentice.trainer.model import load_model as train_load_model


def test_dtype_rule() -> None:
    assert resolve_dtype("auto", "cuda:0") == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("float16", "cpu") == torch.float16


def test_trainer_and_server_load_the_same_model(tmp_path: Path) -> None:
    student = save_tiny_student(tmp_path / "student")
    trained = train_load_model(ModelConfig(name=str(student)), torch.device("cpu"))
    served, tokenizer = serve_load_model(student, "auto", "cpu")
    assert trained.training and not served.training
    assert not trained.config.use_cache  # the trainer's own choice on top of the shared loader
    assert tokenizer.chat_template
    a, b = trained.state_dict(), served.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    bf16, _ = serve_load_model(student, "bfloat16", "cpu")
    assert next(bf16.parameters()).dtype == torch.bfloat16
