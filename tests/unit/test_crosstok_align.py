"""Byte alignment of two real tokenizations of one completion (apprentice.crosstok): the chunks cover the same
bytes on both sides, and the per-token values sum to the teacher's minus the student's logprob of the text,
end of turn included, on texts with unicode, emoji, code, whitespace runs and byte-fallback characters."""

from __future__ import annotations

import random
import unicodedata
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from render_helpers import family, smollm2_tokenizer

from apprentice.crosstok.align import (
    SPREADS,
    AlignError,
    Completion,
    align_completion,
    chunks,
    spread_weights,
    token_values,
)
from apprentice.crosstok.token_bytes import TokenBytes, UnsupportedTokenizer
from apprentice.testing.tiny import build_tiny_tokenizer
from apprentice.testing.tiny_sp import build_tiny_sp_tokenizer

FRAGMENTS = [
    "Hello, world!", " naïve café", " 東京タワー", "🙂", "👩‍👩‍👧‍👦", " 🇫🇷", "    ", "\n\n\n", "\t\t", " x = [i**2 for i in range(10)]",
    "def f(a, b):\n    return a + b\n", "{\"k\": [1, 2.5e-3]}", " Ωμέγα", " ∑∫√", " \u00a0nbsp", " Ⅻ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "ǅ",
    " 1234567890", " -->", "<div class=\"a\">", " العربية", " हिन्दी", "\r\n", "  ",
]  # fmt: skip
TEXTS = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=6)), min_size=0, max_size=12).map("".join)

# Real tokenizers the suite carries (Qwen2's ranks, Llama 3.2, SmolLM2) and two built here: tiny byte-level BPE and
# a SentencePiece-style BPE with byte fallback. (Phi-3's real SentencePiece vocabulary writes a space before text
# tokenized on its own, so this text-alone property does not apply to it; its pieces are checked in
# test_crosstok_endpoint_pieces.py and its teacher side in context in test_llamacpp_replay.py.)
TOKENIZERS: dict[str, Any] = {
    "qwen2.5": lambda: family("qwen2.5"),
    "llama3.2": lambda: family("llama3.2"),
    "smollm2": smollm2_tokenizer,
    "tiny-bpe": lambda: build_tiny_tokenizer(),
    "tiny-sp-bytefallback": lambda: build_tiny_sp_tokenizer(),
}
PAIRS = [("qwen2.5", "llama3.2"), ("llama3.2", "smollm2"), ("smollm2", "qwen2.5"), ("tiny-bpe", "qwen2.5"),
         ("tiny-sp-bytefallback", "llama3.2"), ("qwen2.5", "tiny-sp-bytefallback")]  # fmt: skip
EOT = {"qwen2.5": "<|im_end|>", "llama3.2": "<|eot_id|>", "smollm2": "<|im_end|>", "tiny-bpe": "<|im_end|>",
       "tiny-sp-bytefallback": "<|end|>"}  # fmt: skip

_loaded: dict[str, tuple[Any, TokenBytes]] = {}


def load(name: str) -> tuple[Any, TokenBytes]:
    if name not in _loaded:
        tok = TOKENIZERS[name]()
        _loaded[name] = (tok, TokenBytes(tok))
    return _loaded[name]


def sampled_tokens(tok: Any, text: str, rng: random.Random) -> list[int]:
    """A tokenization a model could sample: the text cut at random places, each piece tokenized on its own
    (not the canonical tokenization of the whole text, as a sampled completion often is not)."""
    cuts = sorted(rng.sample(range(1, len(text)), min(3, len(text) - 1))) if len(text) > 1 else []
    ids: list[int] = []
    for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True):
        ids += tok(text[a:b], add_special_tokens=False)["input_ids"]
    return ids


def check_pair(student_name: str, teacher_name: str, text: str, seed: int) -> None:
    rng = random.Random(seed)
    (s_tok, s_bytes), (t_tok, t_bytes) = load(student_name), load(teacher_name)
    text = unicodedata.normalize("NFC", text)  # Qwen2's normalizer would make any other form another text
    s_ids = sampled_tokens(s_tok, text, rng) + [s_tok.convert_tokens_to_ids(EOT[student_name])]
    t_ids = t_tok(text, add_special_tokens=False)["input_ids"] + [t_tok.convert_tokens_to_ids(EOT[teacher_name])]
    s_lp = [-rng.uniform(0.0, 12.0) for _ in s_ids]
    t_lp = [-rng.uniform(0.0, 12.0) for _ in t_ids]
    s_text, t_text = b"".join(s_bytes(s_ids[:-1])), b"".join(t_bytes(t_ids[:-1]))
    if s_text != t_text:
        # A tokenizer that cannot write the text (SmolLM2's GGUF vocabulary lacks a few bytes, so it drops them):
        # the sample is refused with a kind, never scored as if the texts matched.
        assert text.encode() in (s_text, t_text)
        with pytest.raises(AlignError) as info:
            align_completion(Completion(s_bytes(s_ids), s_lp, True), Completion(t_bytes(t_ids), t_lp, True))
        assert info.value.kind == "text_mismatch"
        return
    assert s_text == text.encode()
    for spread in SPREADS:
        values = align_completion(Completion(s_bytes(s_ids), s_lp, True), Completion(t_bytes(t_ids), t_lp, True),
                                  spread=spread)  # fmt: skip
        assert len(values) == len(s_ids)
        assert abs(sum(values) - (sum(t_lp) - sum(s_lp))) < 1e-4
        assert values[-1] == pytest.approx(t_lp[-1] - s_lp[-1])  # end of turn against end of turn
    # Each chunk covers the same bytes on both sides, and they tile the text in order.
    parts = chunks(s_bytes(s_ids[:-1]), t_bytes(t_ids[:-1]))
    joined = b""
    for c in parts:
        piece = b"".join(s_bytes(s_ids[c.s_start : c.s_end]))
        assert piece == b"".join(t_bytes(t_ids[c.t_start : c.t_end])) and piece
        joined += piece
    assert joined == text.encode()


@pytest.mark.parametrize(("student", "teacher"), PAIRS)
def test_sum_property_over_real_tokenizer_pairs(student: str, teacher: str) -> None:
    load(student), load(teacher)  # outside the examples: loading Qwen2's ranks takes seconds

    @settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(text=TEXTS, seed=st.integers(0, 2**16))
    def prop(text: str, seed: int) -> None:
        check_pair(student, teacher, text, seed)

    prop()


@pytest.mark.parametrize(("student", "teacher"), PAIRS)
def test_sum_property_on_every_fragment(student: str, teacher: str) -> None:
    for i, fragment in enumerate(FRAGMENTS):
        check_pair(student, teacher, "Sure: " + fragment + " done", seed=i)
    check_pair(student, teacher, "".join(FRAGMENTS), seed=99)
    check_pair(student, teacher, "", seed=0)  # an empty answer: only the end of turn


def test_pieces_that_split_a_character_and_byte_fallback_bytes() -> None:
    (llama, l_bytes), (sp, sp_bytes) = load("llama3.2"), load("tiny-sp-bytefallback")
    emoji = "🙂"
    sp_ids = sp(emoji, add_special_tokens=False)["input_ids"]
    assert sp.convert_ids_to_tokens(sp_ids)[-4:] == ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]
    assert sp_bytes(sp_ids)[-4:] == [b"\xf0", b"\x9f", b"\x99", b"\x82"]
    family_ids = llama("👩‍👩‍👧‍👦", add_special_tokens=False)["input_ids"]
    pieces = l_bytes(family_ids)
    assert any(len(p) and not _is_utf8(p) for p in pieces)  # a piece holding part of a character
    assert b"".join(pieces) == "👩‍👩‍👧‍👦".encode()


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_identical_tokenizations_give_one_token_chunks_and_the_plain_estimator() -> None:
    tok, tb = load("qwen2.5")
    ids = tok("The answer is 42, naïvely 🙂", add_special_tokens=False)["input_ids"]
    parts = chunks(tb(ids), tb(ids))
    assert [(c.s_end - c.s_start, c.t_end - c.t_start) for c in parts] == [(1, 1)] * len(ids)
    s_lp, t_lp = [-1.0, -2.0, -0.5] * (len(ids) // 3 + 1), [-0.2, -3.0, -1.0] * (len(ids) // 3 + 1)
    values = token_values(s_lp[: len(ids)], t_lp[: len(ids)], parts)
    assert values == pytest.approx([t - s for s, t in zip(s_lp[: len(ids)], t_lp[: len(ids)], strict=True)])


def test_a_known_chunk_and_how_its_value_is_spread() -> None:
    student = [b"un", b"believ", b"able", b"!"]
    teacher = [b"unbel", b"ievable", b"!"]
    parts = chunks(student, teacher)
    assert [(c.s_start, c.s_end, c.t_start, c.t_end) for c in parts] == [(0, 3, 0, 2), (3, 4, 2, 3)]
    s_lp, t_lp = [-1.0, -2.0, -3.0, -0.5], [-2.0, -1.0, -0.25]
    assert token_values(s_lp, t_lp, parts, spread="even") == pytest.approx([1.0, 1.0, 1.0, 0.25])
    assert token_values(s_lp, t_lp, parts, spread="last") == pytest.approx([0.0, 0.0, 3.0, 0.25])
    assert token_values(s_lp, t_lp, parts, spread="first") == pytest.approx([3.0, 0.0, 0.0, 0.25])
    # surprisal: the chunk's value 3 in the student's proportions 1:2:3 (q_i = T * s_i / S = -3 * s_i / -6)
    assert token_values(s_lp, t_lp, parts, spread="surprisal") == pytest.approx([0.5, 1.0, 1.5, 0.25])


@pytest.mark.parametrize("spread", SPREADS)
def test_every_spread_rule_keeps_the_sum_on_edge_cases(spread: str) -> None:
    """Weights sum to 1 whatever the chunk's student logprobs: all zero (a sure student: surprisal falls back to
    the even split), one token, a very unlikely token next to sure ones."""
    for lps in ([0.0, 0.0, 0.0], [-2.5], [-1e-9, -40.0, 0.0], [-0.3] * 7):
        weights = spread_weights(lps, spread)  # type: ignore[arg-type]
        assert len(weights) == len(lps) and sum(weights) == pytest.approx(1.0, abs=1e-12)
        assert all(w >= 0.0 for w in weights)
    rng = random.Random(3)
    s_lp = [-rng.uniform(0.0, 9.0) for _ in range(6)]
    t_lp = [-rng.uniform(0.0, 9.0) for _ in range(3)]
    parts = chunks([b"a", b"b", b"c", b"d", b"e", b"f"], [b"abc", b"de", b"f"])
    values = token_values(s_lp, t_lp, parts, spread=spread)  # type: ignore[arg-type]
    assert sum(values) == pytest.approx(sum(t_lp) - sum(s_lp), abs=1e-9)


def test_what_cannot_be_aligned_is_refused_with_a_kind() -> None:
    with pytest.raises(AlignError) as info:
        chunks([b"caf", b"e\xcc\x81"], [b"caf\xc3\xa9"])  # decomposed vs composed: other bytes
    assert info.value.kind == "text_mismatch"
    with pytest.raises(AlignError) as info:
        align_completion(Completion([b"a"], [-1.0], False), Completion([b"a", b"<eot>"], [-1.0, -0.1], True))
    assert info.value.kind == "end_of_turn"
    tok, tb = load("qwen2.5")  # Qwen2 normalizes to NFC: a decomposed student text is not the teacher's text
    decomposed = unicodedata.normalize("NFD", "café")
    assert b"".join(tb(tok(decomposed, add_special_tokens=False)["input_ids"])) != decomposed.encode()


def test_roundtrip_and_unsupported_tokenizers() -> None:
    for name in TOKENIZERS:
        _, tb = load(name)
        assert tb.roundtrip_problem("".join(FRAGMENTS[:12])) is None, name

    class Slow:
        name_or_path = "slow-tokenizer"

    with pytest.raises(UnsupportedTokenizer, match="not a fast"):
        TokenBytes(Slow())
