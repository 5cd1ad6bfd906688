"""`apprentice serve MODEL`: an OpenAI-compatible chat server over a transformers model.

Endpoints: POST /v1/chat/completions (streaming SSE ending in `data: [DONE]`, or one JSON body), POST /v1/completions
(token-id prompts and vLLM's `prompt_logprobs` scoring: scoring.py; legacy `echo` + `logprobs` scoring: echo.py),
POST /tokenize and /v1/tokenize (vLLM's shape: tokenize.py), GET /v1/models,
POST /v1/load_weights {"path": DIR, "step": N} (rl mode: `reload` verifies DIR (apprentice.handoff.weights), loads
it and swaps it in; 200 {"step", "path", "reload_s"} once requests admitted afterwards sample with the new weights; a
batch in flight finishes on the old ones), GET /v1/weights
(the step and path being served; step 0 is the model the server started with), the collective weight updates of
`trainer.weight_broadcast = "collective"` (collective.py), GET /stats (batching counters), GET /health.
Requests go through `BatchEngine` (engine.py), which serves concurrent requests as one batch.

Binds 127.0.0.1 unless told otherwise. With `--api-key-var NAME` every endpoint but /health needs
`Authorization: Bearer $NAME`. With `--system-prompt-file F` the server prepends F's text to every conversation,
invisible to clients ("prompt distillation": the teacher is the model plus hidden instructions); note that
`return_token_ids` then returns prompt ids that include it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
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
from safetensors import SafetensorError

from apprentice.handoff.weights import WeightsError, verify
from apprentice.inference.collective import register_collective
from apprentice.inference.engine import BatchEngine, SamplingParams
from apprentice.inference.guards import (
    LimitBody,
    RequestError,
    RequireKey,
    disconnect_response,
    result_unless_disconnected,
)
from apprentice.inference.prompt import PromptBuilder, PromptError
from apprentice.inference.responses import completion_body, stream_chunks
from apprentice.inference.schema import ChatCompletionRequest, LoadWeightsRequest, error_body, validation_error_body
from apprentice.inference.scoring import register_completions
from apprentice.inference.tokenize import register_tokenize
from apprentice.loader import DTYPES, load_causal_lm, resolve_dtype
from apprentice.tokenbytes import vocab_bytes

DEFAULT_MAX_BODY_MB = 8.0
"""Request bodies above this are refused (413) before they are read: a 128k-token prompt is well under 1 MB."""
DEFAULT_BODY_TIMEOUT_S = 60.0
"""A request body must arrive in full within this many seconds of its headers (408 otherwise): 8 MB at 1 Mbit/s."""
DEFAULT_MAX_REQUEST_TOKENS = 65536
"""Largest n x max_tokens of one chat request (400 otherwise): one request may not hold a batch for a whole context
per choice. 16 choices of 4096 tokens, or 64 of 1024."""

log = logging.getLogger(__name__)


def load_model(
    path: str | Path, dtype: str = "auto", device: str | None = None, *, trust_remote_code: bool = False,
    gguf_file: str | None = None,
) -> tuple[Any, Any]:  # fmt: skip
    """(model in eval mode on `device`, tokenizer). "auto" dtype: bfloat16 on CUDA, float32 on CPU.

    A local directory is verified first (WeightsError, one line, for damaged or incomplete weights). With
    `gguf_file` both come from that GGUF file inside `path` (as the trainer's student does).
    """
    from transformers import AutoTokenizer

    if gguf_file is None and Path(path).is_dir():
        verify(Path(path))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    extra: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **extra)
    if tokenizer.chat_template is None:
        raise ValueError(f"{path}: the tokenizer has no chat template; `apprentice serve` needs a chat model")
    model = load_causal_lm(
        path, dtype=resolve_dtype(dtype, device), device=device, trust_remote_code=trust_remote_code, gguf_file=gguf_file
    )
    return model, tokenizer


def load_published(path: Path, current: Any, *, trust_remote_code: bool = False) -> Any:
    """Verify `path`, then load it with the served model's dtype and device; WeightsError (one line) if unusable."""
    verify(path)
    param = next(current.parameters())
    try:
        model = load_causal_lm(path, dtype=param.dtype, device=param.device, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:  # garbled files, unknown architectures
        raise WeightsError(f"weights directory {str(path)!r} could not be loaded: {type(e).__name__}: {e}") from None
    if model.config.vocab_size != current.config.vocab_size:
        raise WeightsError(f"{path}: vocab size {model.config.vocab_size} differs from the served model's "
                           f"{current.config.vocab_size}; load_weights swaps weights of the same model only")  # fmt: skip
    return model


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
    batch_window_s: float = 0.02,
    max_body_bytes: int = int(DEFAULT_MAX_BODY_MB * 2**20),
    trust_remote_code: bool = False,
    gguf_file: str | None = None,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    max_request_tokens: int = DEFAULT_MAX_REQUEST_TOKENS,
) -> FastAPI:
    """The FastAPI app; its lifespan starts and stops the engine thread. `app.state.engine` exposes the counters."""
    model, tokenizer = load_model(model_path, dtype, device, trust_remote_code=trust_remote_code, gguf_file=gguf_file)
    engine = BatchEngine(model, tokenizer, max_batch_size=max_batch_size, batch_window_s=batch_window_s,
                         weights_path=str(model_path))  # fmt: skip
    name = served_name or str(model_path)
    hidden = [{"role": "system", "content": system_prompt}] if system_prompt else []
    hidden += prompt_prefix or []
    max_context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
    prompts = PromptBuilder(tokenizer, max_context)
    parses_tools = "<tool_call>" in str(tokenizer.chat_template)
    token_bytes = vocab_bytes(tokenizer)  # the `bytes` of logprobs entries, read once
    load_lock = asyncio.Lock()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="apprentice serve", lifespan=lifespan)
    app.state.engine = engine
    app.add_middleware(LimitBody, max_bytes=max_body_bytes, timeout_s=body_timeout_s)
    if api_key is not None:  # added last: runs first, so an unauthenticated client cannot even send a body
        app.add_middleware(RequireKey, api_key=api_key)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, e: RequestError) -> JSONResponse:
        # 408: the rest of a trickled body is not waited for; closing the connection frees it (uvicorn would read on).
        headers = {"connection": "close"} if e.status == 408 else None
        return JSONResponse(error_body(str(e), param=e.param, code=e.code), status_code=e.status, headers=headers)

    @app.exception_handler(PromptError)
    async def prompt_error(request: Request, e: PromptError) -> JSONResponse:
        return JSONResponse(error_body(str(e), param=e.param, code=e.code), status_code=400)

    @app.exception_handler(ValidationError)
    async def invalid_request(request: Request, e: ValidationError) -> JSONResponse:
        return JSONResponse(validation_error_body(e), status_code=400)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception) -> JSONResponse:
        # A bug or a failed generation: the client gets JSON it can parse; Starlette re-raises it into the log.
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", "server_error"), status_code=500)

    async def json_body(request: Request) -> Any:
        return _parse_json(await request.body())  # LimitBody caps the body's size

    def prepare(raw: bytes) -> tuple[ChatCompletionRequest, list[int], SamplingParams]:
        """Parse, validate, render and tokenize: up to seconds for megabytes, so in a worker thread."""
        req = ChatCompletionRequest.model_validate(_parse_json(raw))
        if req.stream and (req.logprobs or req.return_token_ids):
            raise RequestError(400, "logprobs and return_token_ids are only supported with stream=false", "stream")
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        prompt_ids = prompts.render(req.conversation(), tools, hidden)
        return req, prompt_ids, _sampling_params(req, len(prompt_ids), max_context, max_request_tokens)

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
        req, prompt_ids, params = await asyncio.to_thread(prepare, await request.body())
        tools = parses_tools and bool(req.tools) and req.tool_choice != "none"
        if req.stream:
            return StreamingResponse(stream_chunks(engine, req, prompt_ids, params, name, tools),
                                     media_type="text/event-stream")  # fmt: skip
        try:
            choices = await result_unless_disconnected(request, engine.submit(prompt_ids, params, req.n))
        except Exception as e:  # answered here, not re-raised: the connection stays usable for the client
            log.error("generation failed", exc_info=e)
            return JSONResponse(error_body(f"generation failed: {type(e).__name__}: {e}", "server_error"),
                                status_code=500)  # fmt: skip
        if choices is None:
            return disconnect_response()
        return JSONResponse(completion_body(req, name, prompt_ids, choices, tools, tokenizer, token_bytes))

    @app.post("/v1/load_weights")
    async def reload(request: Request) -> JSONResponse:
        req = LoadWeightsRequest.model_validate(await json_body(request))
        async with load_lock:  # one load at a time; the swap itself is one reference assignment
            step = engine.weights["step"] + 1 if req.step is None else req.step
            started = time.perf_counter()
            try:
                new_model = await asyncio.to_thread(load_published, Path(req.path), engine.model,
                                                    trust_remote_code=trust_remote_code)  # fmt: skip
            except WeightsError as e:
                log.error("%s", e)
                raise RequestError(400, str(e), param="path", code="invalid_weights") from None
            engine.swap(new_model, step=step, path=req.path)
        return JSONResponse({**engine.weights, "reload_s": time.perf_counter() - started})

    @app.get("/v1/weights")
    async def weights() -> dict[str, Any]:
        return {**engine.weights, **receiver.status()}

    register_completions(app, engine, tokenizer, name, hidden, max_context)  # scoring.py (and echo.py)
    register_tokenize(app, tokenizer, prompts, max_context)  # tokenize.py
    receiver = register_collective(app, engine)  # weights straight from the trainer (collective.py)
    return app


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError as e:
        raise RequestError(400, f"request body is not valid JSON: {e}") from e


def _sampling_params(req: ChatCompletionRequest, prompt_len: int, max_context: int, max_request_tokens: int) -> SamplingParams:
    room = max_context - prompt_len
    max_tokens = req.max_completion_tokens or req.max_tokens or room
    if room <= 0 or max_tokens > room:
        raise RequestError(400, f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                                f"context of {max_context} tokens", param="max_tokens",
                           code="context_length_exceeded")  # fmt: skip
    if req.n * max_tokens > max_request_tokens:  # checked before the engine sees it: it would hold a whole batch
        given = "max_tokens" if req.max_tokens or req.max_completion_tokens else "max_tokens (unset: the context left)"
        raise RequestError(400, f"n ({req.n}) x {given} ({max_tokens}) = {req.n * max_tokens} tokens exceeds this "
                                f"server's limit of {max_request_tokens} generated tokens per request (apprentice serve "
                                f"--max-request-tokens); lower n or max_tokens", param="n",
                           code="request_too_large")  # fmt: skip
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        stop=req.stop_list(),
        seed=req.seed,
        top_logprobs=(req.top_logprobs or 0) if req.logprobs else 0,
    )


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
    p.add_argument("--dtype", choices=["auto", *sorted(DTYPES)], default="auto")
    p.add_argument("--gguf-file", default=None, metavar="NAME",
                   help="a GGUF file inside MODEL to load (dequantised), as [model] gguf_file does for training")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let the model repository's own Python code run (only for repositories you trust)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice); lower it when the server shares the CPU "
                        "with a trainer, or both slow down spinning on the same cores")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--served-model-name", default=None, help="model id reported by /v1/models (default: MODEL)")
    p.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_MB,
                   help="largest request body accepted, in MiB (larger ones get 413 before they are read)")
    p.add_argument("--body-timeout-s", type=float, default=DEFAULT_BODY_TIMEOUT_S,
                   help="seconds a client has to send a whole request body after its headers (408 after that)")
    p.add_argument("--max-request-tokens", type=int, default=DEFAULT_MAX_REQUEST_TOKENS,
                   help="largest n x max_tokens of one chat request (400 above it)")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    import uvicorn

    args = parse_args(argv)
    if not args.max_body_mb > 0:
        print(f"error: --max-body-mb {args.max_body_mb}: must be a positive number of MiB", file=sys.stderr)
        return 2
    if not args.body_timeout_s > 0 or args.max_request_tokens < 1:
        print(f"error: --body-timeout-s ({args.body_timeout_s}) and --max-request-tokens ({args.max_request_tokens}) "
              f"must be positive", file=sys.stderr)  # fmt: skip
        return 2
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
    if args.gguf_file is not None and Path(args.model).is_dir() and not (Path(args.model) / args.gguf_file).is_file():
        print(f"error: --gguf-file {args.gguf_file}: no such file in {args.model}", file=sys.stderr)
        return 2
    prompt_prefix = None
    if args.prompt_prefix_file is not None:
        try:
            prompt_prefix = read_prompt_prefix(args.prompt_prefix_file)
        except ValueError as e:
            print(f"error: --prompt-prefix-file {e}", file=sys.stderr)
            return 2
    try:
        app = build_app(args.model, served_name=args.served_model_name, api_key=api_key, system_prompt=system_prompt, prompt_prefix=prompt_prefix,
                        max_batch_size=args.max_batch_size, dtype=args.dtype, device=args.device,
                        max_body_bytes=int(args.max_body_mb * 2**20), trust_remote_code=args.trust_remote_code,
                        gguf_file=args.gguf_file, body_timeout_s=args.body_timeout_s,
                        max_request_tokens=args.max_request_tokens)  # fmt: skip
    except WeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # no such directory (or hub id offline): transformers' own words, one line
        print(f"error: MODEL {args.model}: could not load it ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
              f"pass a Hugging Face model directory (e.g. OUTPUT/final) or a cached hub id", file=sys.stderr)  # fmt: skip
        return 2
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
