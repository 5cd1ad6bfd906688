"""Map character positions of a rendered text to token positions of its single tokenization, exactly.

A sample's text is tokenized once, with offsets. A boundary at character b (the start of a generated span, or
the end of its end-of-turn token) is *exact* when the ids before it are what the tokenizer gives for text[:b]
on its own: that is what the model saw as its prompt (start) or what it had produced by the end of the turn.

Decision for tokens that straddle b (e.g. ChatML's "assistant\\n" header followed by content starting with "\\n",
which byte-level BPE merges into one "\\n\\n" token): the token is neither purely prompt nor purely generated,
so no mask is exact; we raise RenderError("boundary") rather than guess. For clean boundaries we verify instead
of trusting offsets: the tokenizer splits text at added tokens before anything else, so only the stretch after
the last added token before b can differ; we tokenize just that stretch (e.g. "assistant\\n") and compare, and
only if that disagrees (tokenizers that treat the start of a string specially) tokenize the whole prefix.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

from apprentice.render.errors import RenderError


class TokenizedText:
    """One tokenization of `text` with the lookups needed to place boundaries."""

    def __init__(self, tokenizer: Any, text: str) -> None:
        try:
            encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError as err:  # python (slow) tokenizers have no offsets
            raise TypeError(
                f"render needs a fast (Rust-backed) tokenizer with offsets; got {type(tokenizer).__name__}"
            ) from err
        self.tokenizer = tokenizer
        self.text = text
        self.ids: list[int] = list(encoding["input_ids"])
        offsets: Sequence[tuple[int, int]] = encoding["offset_mapping"]
        self.starts = [int(s) for s, _ in offsets]
        self.ends = [int(e) for _, e in offsets]
        added = set(tokenizer.added_tokens_decoder)
        # Token indices of added tokens: the tokenizer never merges across them.
        self.added_positions = [i for i, tid in enumerate(self.ids) if tid in added]

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def boundary(self, b: int, where: str) -> int:
        """Index i such that ids[:i] are exactly the tokenizer's ids of text[:b]; RenderError if none exists."""
        i = bisect.bisect_left(self.starts, b)
        straddle = (i > 0 and self.ends[i - 1] > b) or (i < len(self.ids) and self.starts[i] == self.ends[i] == b)
        if straddle:
            j = i - 1 if i > 0 and self.ends[i - 1] > b else i
            piece = self.text[self.starts[j] : self.ends[j]]
            raise RenderError(
                "boundary",
                f"{where}: token {piece!r} at characters {self.starts[j]}..{self.ends[j]} straddles position {b} "
                "between template text and generated text, so no loss mask is exact",
            )
        # Stretch since the last added token before i: the only part whose tokenization can depend on what follows.
        k = bisect.bisect_left(self.added_positions, i) - 1
        seg_token = self.added_positions[k] + 1 if k >= 0 else 0
        seg_char = self.ends[seg_token - 1] if seg_token > 0 else 0
        if seg_token == i and seg_char == b:
            return i
        if seg_token > 0 and self._encode(self.text[seg_char:b]) == self.ids[seg_token:i]:
            return i
        if self._encode(self.text[:b]) == self.ids[:i]:
            return i
        raise RenderError(
            "boundary",
            f"{where}: the text before character {b} does not tokenize to a prefix of the sample's ids "
            "(BPE merges across the boundary)",
        )
