"""Token ids of a sample built from its texts without re-tokenizing any prefix, matching inference exactly.

A sample is tok(P0) + gen(C0) + env(E1) + gen(C1) + ... where P0 is the first turn's prompt text, Ck a turn as
the model generates it, and Ek the text the next prompt adds after Ck (tool results, a user turn, the next
generation prompt). Facts used (Hugging Face tokenizers split added tokens out before normalising or
pre-tokenizing, and tokenize each stretch between them on its own):

- A prompt's ids are fixed by the prompt alone: the student saw tok(P). Its generated ids gen(C) are C
  tokenized as a continuation: the ids tok(tail + C) adds after tok(tail), where `tail` is P from its last
  added token on. When those do not extend tok(tail) (a BPE merge across the boundary, e.g. "assistant\\n" +
  "\\n\\nhi" -> one "\\n\\n\\n" token), inference never saw the merged token: the model, given tok(P), emitted
  C as a fresh stretch, so gen(C) = tok(added + C)[1:] and the sample must end after this turn (the next
  prompt's tokenization merges differently, so it cannot extend the sample).
- Ck ends with an end-of-turn token, an added token, so tok(... + Ck + Ek) = ids so far + tok(eot + Ek)[1:].
"""

from __future__ import annotations

from typing import Any


class Tokens:
    """Tokenization helpers for one tokenizer (ids without special tokens added)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.added = frozenset(tokenizer.added_tokens_decoder)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def last_added(self, text: str) -> tuple[int, int] | None:
        """(start, end) in `text` of its last added token, looking only at a growing window at the end."""
        window = 64
        while True:
            lo = max(0, len(text) - window)
            enc = self.tokenizer(text[lo:], add_special_tokens=False, return_offsets_mapping=True)
            for tid, (s, e) in zip(reversed(enc["input_ids"]), reversed(enc["offset_mapping"]), strict=True):
                if tid in self.added and e > s and (lo == 0 or s > 0):
                    return lo + s, lo + e
            if lo == 0:
                return None
            window *= 4

    def after(self, anchor: str, text: str) -> list[int]:
        """ids of `text` as the stretch right after the added token `anchor`."""
        if not text:
            return []
        ids = self.encode(anchor + text)
        first = self.encode(anchor)
        if ids[: len(first)] != first:  # an anchor flag (rstrip) ate into the text: tokenize it on its own
            return self.encode(text)
        return ids[len(first) :]

    def continuation(self, prompt: str, completion: str) -> tuple[list[int], bool]:
        """(ids of `completion` as generated after `prompt`, whether tok(prompt + completion) agrees)."""
        found = self.last_added(prompt)
        start = found[0] if found else 0
        tail = prompt[start:]
        base = self.encode(tail)
        ids = self.encode(tail + completion)
        if ids[: len(base)] == base:
            return ids[len(base) :], True
        if found is None:
            return self.encode(completion), False
        return self.after(prompt[found[0] : found[1]], completion), False
