"""Response bodies of the chat-completions endpoint: one JSON body, or SSE chunks ending in `data: [DONE]`."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from apprentice.inference.engine import BatchEngine, Completion, SamplingParams
from apprentice.inference.schema import ChatCompletionRequest, error_body, new_id, parse_tool_calls


def message_of(c: Completion, tools: bool) -> tuple[dict[str, Any], str]:
    """(assistant message, finish_reason) of one choice, tool calls parsed out when tools were offered."""
    content, calls = parse_tool_calls(c.text) if tools else (c.text, [])
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
        return message, "tool_calls" if c.finish_reason == "stop" else c.finish_reason
    return message, c.finish_reason


def _logprobs(c: Completion, tokenizer: Any, token_bytes: list[bytes | None]) -> dict[str, Any]:
    """OpenAI's `logprobs` of one choice: per generated token its text, logprob, exact `bytes` (from the vocabulary
    entry, apprentice/tokenbytes.py: a token holding part of a character has bytes that are no text alone) and
    its `top_logprobs` alternatives, most likely first."""

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        raw = token_bytes[token_id] if token_id < len(token_bytes) else None
        token = tokenizer.decode([token_id])
        return {"token": token, "logprob": logprob, "bytes": list(raw if raw is not None else token.encode("utf-8"))}

    content = [
        {**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in top]}
        for t, lp, top in zip(c.token_ids, c.logprobs, c.top_logprobs, strict=True)
    ]
    return {"content": content}


def _usage(prompt_ids: list[int], choices: list[Completion]) -> dict[str, int]:
    completion = sum(len(c.token_ids) for c in choices)
    return {"prompt_tokens": len(prompt_ids), "completion_tokens": completion,
            "total_tokens": len(prompt_ids) + completion}  # fmt: skip


def completion_body(req: ChatCompletionRequest, name: str, prompt_ids: list[int], choices: list[Completion],
                     tools: bool, tokenizer: Any, token_bytes: list[bytes | None]) -> dict[str, Any]:  # fmt: skip
    out_choices = []
    for i, c in enumerate(choices):
        message, finish = message_of(c, tools)
        choice: dict[str, Any] = {"index": i, "message": message, "finish_reason": finish,
                                  "logprobs": _logprobs(c, tokenizer, token_bytes) if req.logprobs else None}  # fmt: skip
        if req.return_token_ids:
            choice["token_ids"] = c.token_ids
        out_choices.append(choice)
    body: dict[str, Any] = {"id": new_id(), "object": "chat.completion", "created": int(time.time()), "model": name,
                            "choices": out_choices, "usage": _usage(prompt_ids, choices)}  # fmt: skip
    if req.return_token_ids:
        body["prompt_token_ids"] = prompt_ids
    return body


async def stream_chunks(engine: BatchEngine, req: ChatCompletionRequest, prompt_ids: list[int],
                        params: SamplingParams, name: str, tools: bool) -> AsyncIterator[str]:  # fmt: skip
    """SSE chunks. With tools the text is sent once at the end, after tool calls are parsed out of it.
    If the client goes away, Starlette cancels this generator and the `finally` cancels the generation."""
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

    try:  # the client disconnecting cancels this generator: stop the generation with it
        for i in range(req.n):
            yield chunk(i, {"role": "assistant", "content": ""})
        while (item := await deltas.get()) is not None:
            yield chunk(item[0], {"content": item[1]})
        try:
            choices = future.result()
        except Exception as e:  # the engine failed this request: tell the client in-band, the status is already sent
            yield f"data: {json.dumps(error_body(str(e), 'server_error'))}\n\n"
            yield "data: [DONE]\n\n"
            return
        for i, c in enumerate(choices):
            message, finish = message_of(c, tools)
            if tools:
                delta: dict[str, Any] = {"content": message["content"]}
                if "tool_calls" in message:
                    delta["tool_calls"] = [{"index": k, **call} for k, call in enumerate(message["tool_calls"])]
                yield chunk(i, delta)
            yield chunk(i, {}, finish)
        if req.stream_options is not None and req.stream_options.include_usage:
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': _usage(prompt_ids, choices)})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        future.cancel()  # no-op once the engine has answered
