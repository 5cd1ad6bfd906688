"""The exact bytes each token id stands for, so two tokenizations of one text can be compared byte by byte.

`tokenizer.decode` cannot give them: it returns text, so a token holding half of a UTF-8 character decodes to
U+FFFD, and some decoders tidy spaces. The bytes are read from the token's piece instead, by the convention the
tokenizer's decoder uses (read from the `tokenizers` decoder itself, not guessed from the model's name):

- byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM2): every byte is written as one printable character of the
  GPT-2 byte map ("Ġ" is a space, "Ċ" a newline); a piece maps back to its bytes character by character, so a
  piece that splits an emoji in two gives the emoji's first bytes and the next piece the rest.
- SentencePiece-style pieces (Metaspace / Replace "▁" -> " "), with byte fallback: "<0xF0>" is the byte 0xF0,
  "▁" a space, any other piece its UTF-8.
- added tokens (chat control tokens like <|im_end|>): their text, as they appear in a rendered template.

The table itself is apprentice.tokenbytes' (`vocab_bytes`, shared with off-policy soft targets); this module
adds the refusal of tokenizers whose pieces follow neither convention: a tokenizer of another kind (WordPiece, a
slow Python tokenizer) raises `UnsupportedTokenizer` with the reason, instead of being read wrongly.
"""

from __future__ import annotations

import json
from typing import Any

from apprentice.tokenbytes import vocab_bytes


class UnsupportedTokenizer(ValueError):
    """A tokenizer whose token bytes cannot be read exactly."""


def _decoder_types(state: dict[str, Any]) -> list[dict[str, Any]]:
    """The decoder's steps, flattened (a Sequence decoder lists them under "decoders")."""
    if state.get("type") == "Sequence":
        return [d for sub in state.get("decoders", []) for d in _decoder_types(sub)]
    return [state]


def decoder_scheme(tokenizer: Any) -> str:
    """ "byte_level" or "metaspace": how the tokenizer writes bytes into its pieces; UnsupportedTokenizer otherwise."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
    if backend is None:
        raise UnsupportedTokenizer(
            f"{name}: not a fast (Rust `tokenizers`) tokenizer, so its pieces' bytes are unknown"
        )
    decoder = backend.decoder
    if decoder is None:
        raise UnsupportedTokenizer(f"{name}: the tokenizer has no decoder, so its pieces' bytes are unknown")
    steps = _decoder_types(json.loads(decoder.__getstate__()))
    types = {s.get("type") for s in steps}
    if "ByteLevel" in types:
        return "byte_level"
    replaces_metaspace = any(s.get("type") == "Replace" and s.get("content") == " " and
                             (s.get("pattern") or {}).get("String") == "▁" for s in steps)  # fmt: skip
    if "Metaspace" in types or replaces_metaspace:
        return "metaspace"
    raise UnsupportedTokenizer(
        f"{name}: decoder {sorted(t for t in types if t)} is neither byte-level BPE nor SentencePiece-style pieces; "
        f"cross-tokenizer alignment reads token bytes from those two conventions only"
    )


class TokenBytes:
    """id -> the bytes it stands for, for one tokenizer (the whole vocabulary read once)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.scheme = decoder_scheme(tokenizer)
        self._table = vocab_bytes(tokenizer)

    def of(self, token_id: int) -> bytes:
        found = self._table[token_id] if 0 <= token_id < len(self._table) else None
        if found is None:
            raise UnsupportedTokenizer(f"token id {token_id} has no vocabulary entry")
        return found

    def __call__(self, ids: list[int]) -> list[bytes]:
        return [self.of(i) for i in ids]

    def roundtrip_problem(self, text: str) -> str | None:
        """None when the bytes of tok(text) are exactly text's UTF-8 (a leading space a SentencePiece tokenizer
        prepends is allowed); otherwise what differs. The startup probe checks this on mixed text."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        got = b"".join(self(ids))
        want = text.encode("utf-8")
        if got == want or (self.scheme == "metaspace" and got == b" " + want):
            return None
        at = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
        return f"token bytes give {got[max(0, at - 8) : at + 8]!r} where the text has {want[max(0, at - 8) : at + 8]!r}"
