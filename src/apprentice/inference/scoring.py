"""`POST /v1/completions` of `apprentice serve`: token-id or text prompts, and vLLM's `prompt_logprobs` scoring.

On-policy distillation asks a teacher for the logprob of every token of a student's sample after its prefix
(clients/scoring.py). vLLM answers that on its completions API; this module gives `apprentice serve` the same
request and response shape, so CPU runs and tests need no GPU:

    {"model": M, "prompt": [ids] | "text", "max_tokens": 1, "temperature": 0, "prompt_logprobs": k}
    -> choices[0].prompt_logprobs = [null, {"<id>": {"logprob": lp, "rank": r, "decoded_token": s}, ...}, ...]

The same scores also come in OpenAI's legacy shape (`echo: true` with `logprobs`; echo.py).

Entry i holds the prompt's own token i (rank = 1 + number of tokens the model prefers) plus the k most likely
alternatives, as vLLM does. Scores come from one plain forward pass of the served weights (the newest after
`/v1/load_weights`), in the served dtype, serialised by a lock (one forward at a time next to the engine's
batches). With `prompt_logprobs`, at most one token is generated, from the same forward pass; without it the
request is an ordinary completion through the batching engine.

Hidden instructions (`--system-prompt-file`, `--prompt-prefix-file`) are chat messages. A prompt that starts with
the chat template's own head (what the template renders before the first user turn, e.g. a default system
message) gets the hidden head in its place, so a rendered student conversation is scored as the teacher sees
that conversation; entries for the replaced head are null. Other prompts (plain text) are scored as sent.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from apprentice.inference.echo import EchoText, echo_logprobs
from apprentice.inference.engine import BatchEngine, SamplingParams
from apprentice.inference.prompt import with_hidden_prefix
from apprentice.inference.schema import error_body, new_id, validation_error_body


class CompletionRequest(BaseModel):
    """The supported subset of the OpenAI completions request, plus vLLM's `prompt_logprobs`/`return_token_ids`."""

    model_config = ConfigDict(extra="forbid")
    model: str
    prompt: list[int] | str = Field(min_length=1)
    max_tokens: int = Field(default=16, ge=0)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20)
    """vLLM extension: logprob of every prompt token (plus this many alternatives) in choices[0].prompt_logprobs."""
    return_token_ids: bool = False
    """vLLM extension: prompt_token_ids and token_ids in the choice."""
    echo: bool = False
    """Legacy completions scoring: the prompt comes back in `text` and, with `logprobs`, scored (echo.py)."""
    logprobs: int | None = Field(default=None, ge=0, le=20)
    """Legacy completions: logprob of every returned token plus this many alternatives (with echo: the prompt's)."""
    user: str | None = None


def hidden_head(tokenizer: Any, hidden: list[dict[str, Any]]) -> tuple[list[int], list[int]] | None:
    """(head the template renders before a first user turn, the head it renders with the hidden messages), found
    as the parts before the longest common token suffix of one probe conversation rendered both ways; None when
    there are no hidden messages."""
    if not hidden:
        return None
    probe = [{"role": "user", "content": "probe"}]

    def ids(conversation: list[dict[str, Any]]) -> list[int]:
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        out: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
        return out

    plain, hid = ids(probe), ids(with_hidden_prefix(probe, hidden))
    common = 0
    while common < min(len(plain), len(hid)) and plain[-1 - common] == hid[-1 - common]:
        common += 1
    return plain[: len(plain) - common], hid[: len(hid) - common]


def usage_of(prompt_ids: list[int], generated: list[int]) -> dict[str, int]:
    return {"prompt_tokens": len(prompt_ids), "completion_tokens": len(generated),
            "total_tokens": len(prompt_ids) + len(generated)}  # fmt: skip


@torch.inference_mode()
def score_tokens(model: Any, ids: list[int], top_k: int) -> tuple[list[dict[int, tuple[float, int]] | None], torch.Tensor]:
    """Per position i >= 1: {token id: (logprob, rank)} for ids[i] and the top_k alternatives; and the float32
    logits [V] after the last token (for the one generated token)."""
    device = next(model.parameters()).device
    logits_T_V = model(torch.tensor([ids], device=device), use_cache=False).logits[0].float()
    logprobs_T_V = torch.log_softmax(logits_T_V[:-1], dim=-1)  # row i predicts ids[i + 1]
    targets = torch.tensor(ids[1:], device=device)
    picked = logprobs_T_V.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ranks = (logprobs_T_V > picked.unsqueeze(-1)).sum(-1) + 1
    top_v, top_i = logprobs_T_V.topk(top_k, dim=-1) if top_k else (None, None)
    entries: list[dict[int, tuple[float, int]] | None] = [None]
    for pos, (token, lp, rank) in enumerate(zip(ids[1:], picked.tolist(), ranks.tolist(), strict=True)):
        entry = {token: (lp, rank)}
        if top_v is not None and top_i is not None:
            for r, (alt, alt_lp) in enumerate(zip(top_i[pos].tolist(), top_v[pos].tolist(), strict=True)):
                entry.setdefault(alt, (alt_lp, r + 1))
        entries.append(entry)
    return entries, logits_T_V[-1]


def register_completions(app: FastAPI, engine: BatchEngine, tokenizer: Any, name: str, hidden: list[dict[str, Any]],
                         max_context: int) -> None:  # fmt: skip
    """Add POST /v1/completions to `app` (see the module docstring)."""
    heads = hidden_head(tokenizer, hidden)
    lock = threading.Lock()
    echo_text = EchoText(tokenizer)

    def bad(message: str, param: str | None = None) -> JSONResponse:
        return JSONResponse(error_body(message, param=param), status_code=400)

    def scored(req: CompletionRequest, client_ids: list[int]) -> tuple[list[Any], list[int], list[float]]:
        skip, ids = 0, client_ids
        if heads is not None and client_ids[: len(heads[0])] == heads[0]:
            skip, ids = len(heads[0]), heads[1] + client_ids[len(heads[0]) :]
        offset = len(ids) - len(client_ids)  # hidden tokens before the client's first scored one
        with lock:
            entries, last = score_tokens(engine.model, ids, req.prompt_logprobs or 0)
        out: list[Any] = [None] * len(client_ids)
        for i in range(skip, len(client_ids)):
            entry = entries[i + offset]
            if entry is not None:
                out[i] = {str(t): {"logprob": lp, "rank": rank, "decoded_token": tokenizer.decode([t])}
                          for t, (lp, rank) in entry.items()}  # fmt: skip
        generated: list[int] = []
        if req.max_tokens:
            if req.temperature == 0.0:
                generated = [int(last.argmax())]
            else:
                gen = None if req.seed is None else torch.Generator(device=last.device).manual_seed(req.seed)
                generated = [int(torch.multinomial(torch.softmax(last / req.temperature, -1), 1, generator=gen))]
        return out, generated, [float(torch.log_softmax(last, -1)[t]) for t in generated]

    @app.post("/v1/completions")
    async def completions(request: Request) -> JSONResponse:
        try:
            req = CompletionRequest.model_validate_json(await request.body())
        except ValidationError as e:
            return JSONResponse(validation_error_body(e), status_code=400)
        if isinstance(req.prompt, str):
            client_ids: list[int] = await asyncio.to_thread(lambda: tokenizer(req.prompt)["input_ids"])
        else:
            client_ids = req.prompt
        vocab = len(tokenizer)
        if any(t < 0 or t >= vocab for t in client_ids):
            return bad(f"prompt token ids must be in [0, {vocab})", "prompt")
        if len(client_ids) + req.max_tokens > max_context:
            return bad(f"prompt ({len(client_ids)} tokens) + max_tokens ({req.max_tokens}) exceeds the model's "
                       f"context of {max_context} tokens", "max_tokens")  # fmt: skip
        prompt_logprobs = None
        if req.logprobs is not None and not req.echo:
            return bad("logprobs is supported with echo = true (scoring the prompt); generation logprobs come "
                       "from /v1/chat/completions", "logprobs")  # fmt: skip
        if req.echo:  # legacy completions scoring: the same scores, written in OpenAI's shape (echo.py)
            if req.logprobs is None or req.max_tokens > 1 or req.prompt_logprobs is not None:
                return bad("echo scores the prompt: send logprobs (0-20) and max_tokens 0 or 1, without "
                           "prompt_logprobs", "echo")  # fmt: skip
            entries, generated, generated_lps = await asyncio.to_thread(
                scored, req.model_copy(update={"prompt_logprobs": req.logprobs}), client_ids)
            text, logprobs = echo_logprobs(echo_text, client_ids, entries, list(zip(generated, generated_lps, strict=True)))
            echoed = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": "length", "stop_reason": None}
            return JSONResponse({"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()),
                                 "model": name, "choices": [echoed], "usage": usage_of(client_ids, generated)})  # fmt: skip
        if req.prompt_logprobs is not None:
            if req.max_tokens > 1:
                return bad("with prompt_logprobs, max_tokens must be 0 or 1 (scoring generates at most one token)",
                           "max_tokens")  # fmt: skip
            prompt_logprobs, generated, _ = await asyncio.to_thread(scored, req, client_ids)
            finish, text = "length", tokenizer.decode(generated, skip_special_tokens=True)
        elif req.max_tokens == 0:
            return bad("max_tokens = 0 generates nothing; ask for prompt_logprobs (or echo with logprobs) to score "
                       "the prompt", "max_tokens")  # fmt: skip
        else:
            stop = [req.stop] if isinstance(req.stop, str) else [s for s in req.stop or [] if s]
            params = SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                                    stop=stop, seed=req.seed)  # fmt: skip
            (completion,) = await asyncio.wrap_future(engine.submit(client_ids, params, 1))
            generated, finish, text = completion.token_ids, completion.finish_reason, completion.text
        choice: dict[str, Any] = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish,
                                  "stop_reason": None, "prompt_logprobs": prompt_logprobs}  # fmt: skip
        if req.return_token_ids:
            choice.update(prompt_token_ids=client_ids, token_ids=generated)
        return JSONResponse({"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()),
                             "model": name, "choices": [choice], "usage": usage_of(client_ids, generated)})  # fmt: skip
