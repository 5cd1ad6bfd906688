"""Token strings as /tokenize servers write them map back to the exact bytes of the text: vLLM's pieces
(`convert_ids_to_tokens`) of real byte-level and SentencePiece-style tokenizers, and OpenAI-style text pieces."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from render_helpers import family, smollm2_tokenizer

from apprentice.crosstok.token_bytes import TokenBytes, decoder_scheme
from apprentice.crosstok.vllm_tokenize import Scheme, piece_bytes, tokenize_root
from apprentice.inference.echo import EchoText
from apprentice.testing.tiny import build_tiny_tokenizer
from apprentice.testing.tiny_sp import build_tiny_sp_tokenizer

TEXTS = ["naïve café — 東京 🙂🙂", "x = [i**2 for i in range(3)]\n\tdone", "   spaced   out  \n\n", "\u00e9\u0301 ÿ"]


TOKENIZERS: dict[str, Callable[[], Any]] = {
    "qwen2.5": lambda: family("qwen2.5"),
    "llama3.2": lambda: family("llama3.2"),
    "smollm2": smollm2_tokenizer,
    "phi3": lambda: family("phi3.5"),
    "tiny-bpe": build_tiny_tokenizer,
    "tiny-sp-bytefallback": build_tiny_sp_tokenizer,
}


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@pytest.mark.parametrize("text", TEXTS)
def test_vllm_pieces_and_text_pieces_give_the_token_bytes(name: str, text: str) -> None:
    tok = TOKENIZERS[name]()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    want = TokenBytes(tok)(ids)
    scheme: Scheme = "byte_level" if decoder_scheme(tok) == "byte_level" else "metaspace"
    assert [piece_bytes(p, scheme) for p in tok.convert_ids_to_tokens(ids)] == want
    echo = EchoText(tok)
    assert [piece_bytes(echo.piece_of(i), "text") for i in ids] == want


def test_tokenize_lives_beside_v1() -> None:
    assert tokenize_root("http://h:8000/v1") == "http://h:8000"
    assert tokenize_root("http://h:8000/v1/") == "http://h:8000"
    assert tokenize_root("http://h:8000") == "http://h:8000"
