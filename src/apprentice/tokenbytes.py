"""The exact bytes of every token of a vocabulary, and the map from bytes back to one token id.

OpenAI-compatible chat APIs name each returned token by its UTF-8 `bytes` (a token that holds part of a
multi-byte character has bytes that are no text alone; its `token` string is then a replacement character).
Bytes are the one name a teacher's token and a student's token can share across two tokenizers, so both ends
of off-policy soft targets use them: `apprentice serve` reports them (inference/responses.py) and the orchestrator
maps a teacher's tokens to student ids (orchestrator/soft_targets.py).

A token's bytes are read from its vocabulary entry, not from `decode([id])` (which turns partial characters into
U+FFFD and may strip or add spaces):
  - byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM): each character of the entry stands for one byte, through
    GPT-2's printable-byte table;
  - SentencePiece: `▁` is a space, `<0xAB>` a byte-fallback token of one byte, other text is UTF-8;
  - special and added tokens (`<|im_end|>`): their text. They never count as a mapping target (a teacher's
    generated text holding one is set aside by render).
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@functools.cache
def gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's table from the printable character standing for each byte back to the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[chr(byte)] = byte
        else:
            table[chr(256 + extra)] = byte
            extra += 1
    return table


def _is_byte_level(tokenizer: Any) -> bool:
    decoder_object = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder_object is None:
        return False
    decoder = json.loads(decoder_object.__getstate__())
    parts = decoder.get("decoders", [decoder]) if isinstance(decoder, dict) else []
    return any(isinstance(p, dict) and p.get("type") == "ByteLevel" for p in parts)


def vocab_bytes(tokenizer: Any) -> list[bytes | None]:
    """[len(tokenizer)] the bytes of each token id (None for an id with no entry)."""
    entries = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(getattr(tokenizer, "all_special_ids", [])) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    byte_level = _is_byte_level(tokenizer)
    out: list[bytes | None] = []
    for token_id, entry in enumerate(entries):
        if entry is None:
            out.append(None)
        elif token_id in special:
            out.append(entry.encode("utf-8"))
        else:
            out.append(piece_bytes(entry, byte_level))
    return out


def piece_bytes(piece: str, byte_level: bool) -> bytes:
    """The bytes one ordinary vocabulary piece stands for: through GPT-2's table where the tokenizer is byte-level
    (and every character is in it); a byte-fallback piece `<0xAB>` is its one byte; other text its UTF-8, `▁` a
    space."""
    if byte_level:
        table = gpt2_byte_decoder()
        if all(c in table for c in piece):
            return bytes(table[c] for c in piece)
    if match := BYTE_FALLBACK.match(piece):
        return bytes([int(match.group(1), 16)])
    return piece.replace("▁", " ").encode("utf-8")


def bytes_to_id(tokenizer: Any, *, special: bool = False) -> dict[bytes, int | None]:
    """Bytes -> the one ordinary token id with exactly those bytes (with `special`: the one special or added
    token with that text instead); None where several ids share them (no unique target)."""
    specials = set(getattr(tokenizer, "all_special_ids", [])) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    out: dict[bytes, int | None] = {}
    for token_id, raw in enumerate(vocab_bytes(tokenizer)):
        if raw is None or (token_id in specials) != special or not raw:
            continue
        out[raw] = None if raw in out else token_id
    return out
