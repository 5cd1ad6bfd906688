"""`apprentice serve MODEL`: an OpenAI-compatible chat server over a transformers model.

Endpoints: POST /v1/chat/completions (streaming SSE ending in `data: [DONE]`, or one JSON body), POST /v1/completions
(token-id prompts and vLLM's `prompt_logprobs` scoring: scoring.py), GET /v1/models,
POST /v1/load_weights {"path": DIR, "step": N} (hot-swap weights, rl mode: 200 {"step", "path"} once requests
admitted afterwards sample with the new weights; a batch in flight finishes on the old ones), GET /v1/weights
(the step and path being served; step 0 is the model the server started with), GET /stats (batching counters), GET /health.
Requests go through `BatchEngine` (engine.py), which serves concurrent requests as one batch.

Binds 127.0.0.1 unless told otherwise. With `--api-key-var NAME` every endpoint but /health needs
`Authorization: Bearer $NAME`. With `--system-prompt-file F` the server prepends F's text to every conversation,
invisible to clients ("prompt distillation": the teacher is the model plus hidden instructions); note that
`return_token_ids` then returns prompt ids that include it.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from apprentice.inference.engine import BatchEngine, Completion, SamplingParams
from apprentice.inference.schema import (
    ChatCompletionRequest,
    LoadWeightsRequest,
    error_body,
    new_id,
    parse_tool_calls,
    validation_error_body,
)
from apprentice.inference.scoring import register_completions
from apprentice.inference.weights import DTYPES, WeightsError, load_causal_lm, load_reload, resolve_dtype


class RequestError(Exception):
    """A request we refuse with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def load_model(path: str | Path, dtype: str = "auto", device: str | None = None) -> tuple[Any, Any]:
    """(model in eval mode on `device`, tokenizer). "auto" dtype: bfloat16 on CUDA, float32 on CPU."""
    from transformers import AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.chat_template is None:
        raise ValueError(f"{path}: the tokenizer has no chat template; `apprentice serve` needs a chat model")
    return load_causal_lm(path, resolve_dtype(dtype, device), device), tokenizer


def build_app(
    model_path: str | Path,
    *,
    served_name: str | None = None,
    api_key: str | None = None,
    system_prompt: str | None = None,
    prompt_prefix: list[dict[str, Any]] | None = None,
    max_batch_size: int = 32,
    dtype: str = "auto",
    device: str | None = None,
    batch_window_s: float = 0.005,
) -> FastAPI:
    """The FastAPI app; its lifespan starts and stops the engine thread. `app.state.engine` exposes the counters."""
    model, tokenizer = load_model(model_path, dtype, device)
    engine = BatchEngine(model, tokenizer, max_batch_size=max_batch_size, batch_window_s=batch_window_s,
                         weights_path=str(model_path))  # fmt: skip
    name = served_name or str(model_path)
    hidden = [{"role": "system", "content": system_prompt}] if system_prompt else []
    hidden += prompt_prefix or []
    max_context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
    parses_tools = "<tool_call>" in str(tokenizer.chat_template)
    load_lock = asyncio.Lock()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="apprentice serve", lifespan=lifespan)
    app.state.engine = engine

    @app.middleware("http")
    async def require_key(request: Request, call_next: Any) -> Any:
        if api_key is not None and request.url.path != "/health":
            sent = request.headers.get("authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Bearer {api_key}".encode()):
                return JSONResponse(error_body("Invalid or missing API key (Authorization: Bearer ...).",
                                               "authentication_error", code="invalid_api_key"), status_code=401)  # fmt: skip
        return await call_next(request)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, e: RequestError) -> JSONResponse:
        return JSONResponse(error_body(str(e), param=e.param, code=e.code), status_code=e.status)

    @app.exception_handler(ValidationError)
    async def invalid_request(request: Request, e: ValidationError) -> JSONResponse:
        return JSONResponse(validation_error_body(e), status_code=400)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/stats")
    async def stats() -> dict[str, float]:
        return dict(engine.stats)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": name, "object": "model", "created": 0, "owned_by": "apprentice", "max_model_len": max_context}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> JSONResponse | StreamingResponse:
        req = ChatCompletionRequest.model_validate(await _json(request))
        prompt_ids = _render_prompt(tokenizer, req, hidden)
        params = _sampling_params(req, len(prompt_ids), max_context)
        if req.stream and (req.logprobs or req.return_token_ids):
            raise RequestError(400, "logprobs and return_token_ids are only supported with stream=false", "stream")
        tools = parses_tools and bool(req.tools) and req.tool_choice != "none"
        if req.stream:
            return StreamingResponse(_stream(engine, req, prompt_ids, params, name, tools),
                                     media_type="text/event-stream")  # fmt: skip
        choices = await asyncio.wrap_future(engine.submit(prompt_ids, params, req.n))
        return JSONResponse(_completion_body(req, name, prompt_ids, choices, tools, tokenizer))

    @app.post("/v1/load_weights")
    async def load_weights(request: Request) -> JSONResponse:
        req = LoadWeightsRequest.model_validate(await _json(request))
        async with load_lock:  # one load at a time; the swap itself is one reference assignment
            step = engine.weights["step"] + 1 if req.step is None else req.step
            try:
                new_model = await asyncio.to_thread(load_reload, Path(req.path), engine.model)
            except WeightsError as e:
                raise RequestError(400, str(e), param="path", code="invalid_weights") from None
            engine.swap_model(new_model, step=step, path=req.path)
        return JSONResponse(dict(engine.weights))

    @app.get("/v1/weights")
    async def weights() -> dict[str, Any]:
        return dict(engine.weights)

    register_completions(app, engine, tokenizer, name, hidden, max_context, with_hidden_prefix)  # scoring.py
    return app


async def _json(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except ValueError as e:
        raise RequestError(400, f"request body is not valid JSON: {e}") from e


def with_hidden_prefix(conversation: list[dict[str, Any]], hidden: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Prepend the server's hidden messages; a hidden system message merges with the client's own system turn."""
    if not hidden:
        return conversation
    if hidden[0]["role"] == "system" and conversation and conversation[0]["role"] == "system":
        merged = {**conversation[0], "content": f"{hidden[0]['content']}\n\n{conversation[0].get('content') or ''}"}
        return [merged, *hidden[1:], *conversation[1:]]
    return [*hidden, *conversation]


def _render_prompt(tokenizer: Any, req: ChatCompletionRequest, hidden: list[dict[str, Any]]) -> list[int]:
    conversation = with_hidden_prefix(req.conversation(), hidden)
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    try:
        text = tokenizer.apply_chat_template(conversation, tools=tools, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # jinja raises for conversations the template refuses (e.g. roles must alternate)
        raise RequestError(400, f"the chat template rejected the conversation: {e}", param="messages") from e
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


def _sampling_params(req: ChatCompletionRequest, prompt_len: int, max_context: int) -> SamplingParams:
    room = max_context - prompt_len
    max_tokens = req.max_completion_tokens or req.max_tokens or room
    if room <= 0 or max_tokens > room:
        raise RequestError(400, f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                                f"context of {max_context} tokens", param="max_tokens",
                           code="context_length_exceeded")  # fmt: skip
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        stop=req.stop_list(),
        seed=req.seed,
        top_logprobs=(req.top_logprobs or 0) if req.logprobs else 0,
    )


def _message(c: Completion, tools: bool) -> tuple[dict[str, Any], str]:
    """(assistant message, finish_reason) of one choice, tool calls parsed out when tools were offered."""
    content, calls = parse_tool_calls(c.text) if tools else (c.text, [])
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
        return message, "tool_calls" if c.finish_reason == "stop" else c.finish_reason
    return message, c.finish_reason


def _logprobs(c: Completion, tokenizer: Any) -> dict[str, Any]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        token = tokenizer.decode([token_id])
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    content = [
        {**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in top]}
        for t, lp, top in zip(c.token_ids, c.logprobs, c.top_logprobs, strict=True)
    ]
    return {"content": content}


def _usage(prompt_ids: list[int], choices: list[Completion]) -> dict[str, int]:
    completion = sum(len(c.token_ids) for c in choices)
    return {"prompt_tokens": len(prompt_ids), "completion_tokens": completion,
            "total_tokens": len(prompt_ids) + completion}  # fmt: skip


def _completion_body(req: ChatCompletionRequest, name: str, prompt_ids: list[int], choices: list[Completion],
                     tools: bool, tokenizer: Any) -> dict[str, Any]:  # fmt: skip
    out_choices = []
    for i, c in enumerate(choices):
        message, finish = _message(c, tools)
        choice: dict[str, Any] = {"index": i, "message": message, "finish_reason": finish,
                                  "logprobs": _logprobs(c, tokenizer) if req.logprobs else None}  # fmt: skip
        if req.return_token_ids:
            choice["token_ids"] = c.token_ids
        out_choices.append(choice)
    body: dict[str, Any] = {"id": new_id(), "object": "chat.completion", "created": int(time.time()), "model": name,
                            "choices": out_choices, "usage": _usage(prompt_ids, choices)}  # fmt: skip
    if req.return_token_ids:
        body["prompt_token_ids"] = prompt_ids
    return body


async def _stream(engine: BatchEngine, req: ChatCompletionRequest, prompt_ids: list[int], params: SamplingParams,
                  name: str, tools: bool) -> AsyncIterator[str]:  # fmt: skip
    """SSE chunks. With tools the text is sent once at the end, after tool calls are parsed out of it."""
    loop = asyncio.get_running_loop()
    deltas: asyncio.Queue[tuple[int, str] | None] = asyncio.Queue()

    def on_delta(index: int, text: str) -> None:  # engine thread -> event loop
        loop.call_soon_threadsafe(deltas.put_nowait, (index, text))

    future = engine.submit(prompt_ids, params, req.n, None if tools else on_delta)
    # Runs after every delta callback of this request (same thread, FIFO), so None arrives last.
    future.add_done_callback(lambda _: loop.call_soon_threadsafe(deltas.put_nowait, None))
    head = {"id": new_id(), "object": "chat.completion.chunk", "created": int(time.time()), "model": name}

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> str:
        body = {**head, "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        return f"data: {json.dumps(body)}\n\n"

    for i in range(req.n):
        yield chunk(i, {"role": "assistant", "content": ""})
    while (item := await deltas.get()) is not None:
        yield chunk(item[0], {"content": item[1]})
    try:
        choices = future.result()
    except Exception as e:  # the engine failed this batch: tell the client in-band, the status is already sent
        yield f"data: {json.dumps(error_body(str(e), 'server_error'))}\n\n"
        yield "data: [DONE]\n\n"
        return
    for i, c in enumerate(choices):
        message, finish = _message(c, tools)
        if tools:
            delta: dict[str, Any] = {"content": message["content"]}
            if "tool_calls" in message:
                delta["tool_calls"] = [{"index": k, **call} for k, call in enumerate(message["tool_calls"])]
            yield chunk(i, delta)
        yield chunk(i, {}, finish)
    if req.stream_options is not None and req.stream_options.include_usage:
        yield f"data: {json.dumps({**head, 'choices': [], 'usage': _usage(prompt_ids, choices)})}\n\n"
    yield "data: [DONE]\n\n"


def read_prompt_prefix(path: Path) -> list[dict[str, Any]]:
    """A JSON list of {"role", "content"} messages; ValueError naming the file and the entry otherwise."""
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        messages = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{path}: expected a non-empty JSON list of chat messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant") or not isinstance(message.get("content"), str):
            raise ValueError(f"{path}: entry {i} must be {{\"role\": \"system\"|\"user\"|\"assistant\", \"content\": \"...\"}}")
    return messages


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="apprentice serve", description="OpenAI-compatible chat server over a model.")
    p.add_argument("model", help="a Hugging Face model directory (or hub id, if already cached)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback only)")
    p.add_argument("--api-key-var", default=None, help="name of an env var holding the key clients must send")
    p.add_argument("--max-batch-size", type=int, default=32, help="sequences decoded together in one batch")
    p.add_argument("--system-prompt-file", type=Path, default=None, help="hidden system prompt for every request")
    p.add_argument("--prompt-prefix-file", type=Path, default=None,
                   help="JSON list of chat messages (e.g. instructions and worked examples) prepended to every request")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="auto")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice); lower it when the server shares the CPU "
                        "with a trainer, or both slow down spinning on the same cores")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--served-model-name", default=None, help="model id reported by /v1/models (default: MODEL)")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    import uvicorn

    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    api_key = None
    if args.api_key_var is not None:
        api_key = os.environ.get(args.api_key_var)
        if not api_key:
            print(f"error: --api-key-var {args.api_key_var}: the environment variable is not set; "
                  f"export {args.api_key_var}=... (the key clients must send)", file=sys.stderr)  # fmt: skip
            return 2
    system_prompt = None
    if args.system_prompt_file is not None:
        if not args.system_prompt_file.is_file():
            print(f"error: --system-prompt-file {args.system_prompt_file}: no such file", file=sys.stderr)
            return 2
        system_prompt = args.system_prompt_file.read_text(encoding="utf-8").strip()
    prompt_prefix = None
    if args.prompt_prefix_file is not None:
        try:
            prompt_prefix = read_prompt_prefix(args.prompt_prefix_file)
        except ValueError as e:
            print(f"error: --prompt-prefix-file {e}", file=sys.stderr)
            return 2
    app = build_app(args.model, served_name=args.served_model_name, api_key=api_key, system_prompt=system_prompt, prompt_prefix=prompt_prefix,
                    max_batch_size=args.max_batch_size, dtype=args.dtype, device=args.device)  # fmt: skip
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
