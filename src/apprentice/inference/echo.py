"""The legacy completions scoring shape (`echo: true` + `logprobs`) of `apprentice serve`'s /v1/completions.

OpenAI's legacy completions API, and vLLM and several hosted providers after it, score a prompt when asked to
echo it back with logprobs and generate (almost) nothing:

    {"model": M, "prompt": [ids] | "text", "echo": true, "logprobs": k, "max_tokens": 0 | 1, "temperature": 0}
    -> choices[0].text = the prompt's text (+ the generated token's)
       choices[0].logprobs = {"tokens": [piece, ...], "token_logprobs": [null, lp_1, ...],
                              "top_logprobs": [null, {piece: lp, ...}, ...], "text_offset": [0, c_1, ...]}

Entry i is the prompt token i: its text, its logprob after tokens 0..i-1 (null for the first), its top-k
alternatives (plus itself) keyed by their text, and the character offset in `text` where it starts. A token
holding only part of a character (byte-level BPE splits emoji) is written "bytes:\\xf0\\x9f" as OpenAI does, and
its offset is that of the character it starts inside. The scores are the ones the `prompt_logprobs` path
computes (scoring.py): one forward pass of the served weights; this module only writes them in this shape.
"""

from __future__ import annotations

from typing import Any

from apprentice.crosstok.token_bytes import TokenBytes, UnsupportedTokenizer


class EchoText:
    """Token pieces, text and character offsets of a token sequence, for one tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        try:
            self.token_bytes: TokenBytes | None = TokenBytes(tokenizer)
        except UnsupportedTokenizer:
            self.token_bytes = None  # pieces and offsets from per-token decoding instead

    def pieces(self, ids: list[int]) -> tuple[list[str], str, list[int]]:
        """(piece of each token, the whole text, character offset where each token starts in it)."""
        if self.token_bytes is None:
            pieces = [self.tokenizer.decode([t]) for t in ids]
            offsets, at = [], 0
            for p in pieces:
                offsets.append(at)
                at += len(p)
            return pieces, "".join(pieces), offsets
        raw = self.token_bytes(ids)
        whole = b"".join(raw)
        out, offsets, at = [], [], 0
        for b in raw:
            # Characters complete before this token's first byte; a token starting inside a character belongs to it.
            offsets.append(len(whole[:at].decode("utf-8", errors="ignore")))
            at += len(b)
            out.append(self.piece(b))
        return out, whole.decode("utf-8", errors="replace"), offsets

    @staticmethod
    def piece(b: bytes) -> str:
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{x:02x}" for x in b)

    def piece_of(self, token_id: int) -> str:
        if self.token_bytes is None:
            return str(self.tokenizer.decode([token_id]))
        return self.piece(self.token_bytes.of(token_id))


def echo_logprobs(
    text: EchoText, ids: list[int], entries: list[dict[str, Any] | None], generated: list[tuple[int, float]]
) -> tuple[str, dict[str, Any]]:
    """(choices[0].text, choices[0].logprobs) from prompt_logprobs-shaped `entries` ([T], keyed by str(token id),
    the prompt token's own entry among them; None where there is no score) and the generated (id, logprob)s."""
    all_ids = ids + [t for t, _ in generated]
    pieces, whole, offsets = text.pieces(all_ids)
    token_logprobs: list[float | None] = []
    top: list[dict[str, float] | None] = []
    for i, entry in enumerate(entries):
        if entry is None:
            token_logprobs.append(None)
            top.append(None)
            continue
        token_logprobs.append(float(entry[str(ids[i])]["logprob"]))
        alternatives: dict[str, float] = {}
        for key, value in entry.items():
            # Two ids can share a text (rare); keep the likelier, as a text-keyed map can hold only one.
            piece = text.piece_of(int(key))
            alternatives[piece] = max(alternatives.get(piece, -float("inf")), float(value["logprob"]))
        top.append(alternatives)
    for token, logprob in generated:
        token_logprobs.append(logprob)
        top.append({text.piece_of(token): logprob})
    return whole, {"tokens": pieces, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}
