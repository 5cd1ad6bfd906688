"""A second tiny chat model on a different kind of tokenizer, for cross-tokenizer tests and the bench.

The tokenizer is SentencePiece-style BPE with byte fallback (pieces written with "▁" for spaces; any character
outside the learned vocabulary becomes one <0xNN> token per UTF-8 byte, as Llama 2, Mistral and Gemma do),
trained offline with `tokenizers` in well under a second, and a Phi-3-style chat template whose turns end with
`<|end|>`: everything differs from `tiny.py`'s byte-level BPE and ChatML (ids, merges, template, end of turn).
"""

from __future__ import annotations

import functools
import json
import random
import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from apprentice.testing.tiny import _CORPUS, CHATML_TEMPLATE, SPECIAL_TOKENS, build_tiny_model

SP_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]

PHI_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|' + message.role + '|>\\n' + (message.content or '') + '<|end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)


def letter_words(n: int, seed: int = 0) -> list[str]:
    """`n` lines of pseudo-words (2 to 7 random lowercase letters each, seeded): a corpus whose BPE merges cover
    common letter sequences the way a large vocabulary's merges cover a language."""
    rng = random.Random(seed)
    letters = string.ascii_lowercase
    return [" ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 7))) for _ in range(12)) for _ in range(n)]


@functools.lru_cache(maxsize=2)
def _sp_tokenizer_json(vocab_size: int, words: int = 0) -> str:
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("▁?[^▁]+|▁+"), behavior="isolated")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 256, special_tokens=SP_SPECIAL_TOKENS, show_progress=False)
    tok.train_from_iterator([line.replace("\n", " ") for line in _CORPUS] * 4 + letter_words(words), trainer=trainer)
    # The 256 byte pieces join the model's own vocabulary (as in a SentencePiece model), not the added tokens:
    # byte fallback looks them up there.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    return json.dumps(spec)


def build_tiny_sp_tokenizer(vocab_size: int = 600, words: int = 0) -> PreTrainedTokenizerFast:
    """SentencePiece-style BPE with byte fallback and the Phi-3-style template above (end of turn `<|end|>`),
    trained on the tiny chat corpus plus `words` lines of `letter_words` (a wider vocabulary of letter pieces)."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_sp_tokenizer_json(vocab_size, words)),
        bos_token=None, eos_token="<|end|>", pad_token="<unk>", unk_token="<unk>",
    )  # fmt: skip
    tok.chat_template = PHI_TEMPLATE
    return tok


def save_tiny_sp_model(path: str | Path, seed: int = 0, vocab_size: int = 600, words: int = 0) -> Path:
    """A loadable Hugging Face directory: a tiny 2-layer model on the byte-fallback tokenizer."""
    path = Path(path)
    return _save_with_end(build_tiny_sp_tokenizer(vocab_size, words), "<|end|>", seed, path)


@functools.lru_cache(maxsize=1)
def _ascii_tokenizer_json(vocab_size: int) -> str:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # No initial alphabet: only the bytes the (ASCII) corpus holds become tokens.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok.to_str()


def save_ascii_student(path: str | Path, seed: int = 0, vocab_size: int = 400) -> Path:
    """A tiny ChatML student whose byte-level BPE holds ASCII bytes only, so that even an untrained model's samples
    are text (a random model on a full byte vocabulary mostly samples bytes that form no character, which a
    teacher of another tokenizer cannot score): for end-to-end cross-tokenizer runs."""
    path = Path(path)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_ascii_tokenizer_json(vocab_size)),
        bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
    )  # fmt: skip
    tok.chat_template = CHATML_TEMPLATE
    return _save_with_end(tok, "<|im_end|>", seed, path)


def _save_with_end(tok: PreTrainedTokenizerFast, end_token: str, seed: int, path: Path) -> Path:
    """A tiny random model for `tok` that stops at `end_token`, saved with the tokenizer at `path`."""
    model = build_tiny_model(len(tok), seed=seed)
    end = tok.convert_tokens_to_ids(end_token)
    for config in (model.config, model.generation_config):
        config.eos_token_id = end
        config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
