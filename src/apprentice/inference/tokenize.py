"""`POST /tokenize` of `apprentice serve`, shaped like vLLM's: a chat conversation or a text -> the served
tokenizer's ids.

    {"model": M, "messages": [...], "add_generation_prompt": true, "tools": [...]}   (chat template applied)
    {"model": M, "prompt": "text", "add_special_tokens": true}                        (plain text)
    -> {"count": n, "max_model_len": L, "tokens": [ids], "token_strs": [pieces] | null}

`return_token_strs: true` adds each token's text ("bytes:\\x..." for a piece of a character, as in echo.py).
A cross-tokenizer client asks it for the teacher-side prompt: the conversation in the teacher's own template.
Hidden instructions (`--system-prompt-file`) are not shown: the ids are of the conversation as sent (the
completions endpoint puts the hidden head in when it scores them). Served at /tokenize (vLLM's path, beside
/v1) and /v1/tokenize.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from apprentice.inference.echo import EchoText
from apprentice.inference.prompt import PromptBuilder, PromptError
from apprentice.inference.schema import error_body, validation_error_body


class TokenizeRequest(BaseModel):
    """vLLM's two tokenize requests in one: `messages` (chat) or `prompt` (text)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    messages: list[dict[str, Any]] | None = Field(default=None, min_length=1)
    tools: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True
    """Chat: end with the assistant's generation prompt (what the model sees before it answers)."""
    continue_final_message: bool = False
    """Chat: leave the last (assistant) message open instead of ending its turn."""
    prompt: str | None = None
    add_special_tokens: bool | None = None
    """Add the tokenizer's BOS/EOS; default true for a text prompt, false for a chat (the template has them)."""
    return_token_strs: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("send either messages (a chat) or prompt (a text)")
        if self.add_generation_prompt and self.continue_final_message and self.messages is not None:
            raise ValueError("add_generation_prompt and continue_final_message cannot both be true")
        return self


def tokenize(req: TokenizeRequest, tokenizer: Any, prompts: PromptBuilder) -> list[int]:
    if req.prompt is not None:
        ids: list[int] = tokenizer(req.prompt, add_special_tokens=req.add_special_tokens is not False)["input_ids"]
        return ids
    assert req.messages is not None
    if req.add_generation_prompt and not req.chat_template_kwargs and not req.add_special_tokens:
        return prompts.render(req.messages, req.tools, [])  # the chat endpoint's own rendering of a prompt
    try:
        text = tokenizer.apply_chat_template(
            req.messages, tools=req.tools, add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message, tokenize=False, **(req.chat_template_kwargs or {}),
        )  # fmt: skip
    except Exception as e:  # jinja raises for conversations the template refuses
        raise PromptError(f"the chat template rejected the conversation: {e}") from e
    ids = tokenizer(str(text), add_special_tokens=bool(req.add_special_tokens))["input_ids"]
    return ids


def register_tokenize(app: FastAPI, tokenizer: Any, prompts: PromptBuilder, max_context: int) -> None:
    """Add POST /tokenize and /v1/tokenize to `app` (see the module docstring)."""
    text = EchoText(tokenizer)

    async def handle(request: Request) -> JSONResponse:
        try:
            req = TokenizeRequest.model_validate_json(await request.body())
        except ValidationError as e:
            return JSONResponse(validation_error_body(e), status_code=400)
        try:
            ids = await asyncio.to_thread(tokenize, req, tokenizer, prompts)
        except PromptError as e:
            return JSONResponse(error_body(str(e), param=e.param, code=e.code), status_code=400)
        strs = [text.piece_of(t) for t in ids] if req.return_token_strs else None
        return JSONResponse({"count": len(ids), "max_model_len": max_context, "tokens": ids, "token_strs": strs})

    app.add_api_route("/tokenize", handle, methods=["POST"])
    app.add_api_route("/v1/tokenize", handle, methods=["POST"])
