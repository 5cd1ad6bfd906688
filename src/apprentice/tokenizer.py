"""Load the student's tokenizer (with its chat template) from the [model] section."""

from __future__ import annotations

from typing import Any

from apprentice.config import ModelConfig


def load_tokenizer(model: ModelConfig) -> Any:
    """The student's transformers tokenizer; fails clearly when it has no chat template to render with."""
    from transformers import AutoTokenizer

    source = model.tokenizer or model.name
    kwargs: dict[str, Any] = {"trust_remote_code": model.trust_remote_code}
    if model.gguf_file and model.tokenizer is None:
        kwargs["gguf_file"] = model.gguf_file
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"the tokenizer of {source!r} has no chat template, so conversations cannot be rendered the way the "
            f"student sees them; set model.tokenizer to a tokenizer that has one"
        )
    return tokenizer
