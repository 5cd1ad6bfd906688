"""On-policy distillation from a teacher with another tokenizer, through a real `apprentice serve` on loopback:
the startup probe (tokenizer, protocol, self-test), both scoring protocols, and per-sample sums equal to the
teacher's minus the student's logprob of the completion text computed directly with transformers (fp32)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi import Request
from fastapi.responses import JSONResponse
from fault_teacher import serve_asgi
from transformers import AutoModelForCausalLM, AutoTokenizer

from apprentice.config import ConfigError, TeacherEndpointConfig
from apprentice.config.orchestrator import OnPolicyDistillConfig
from apprentice.inference.server import build_app
from apprentice.orchestrator.on_policy import OnPolicyDistiller
from apprentice.render.tokens import render_tokens
from apprentice.testing.tiny import build_tiny_tokenizer, save_tiny_student
from apprentice.testing.tiny_sp import save_tiny_sp_model

ANSWERS = ["dlrow olleh", "naïve café 🙂", "x = [i**2 for i in range(3)]\n\tdone", "   spaced   out  ", ""]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_sp_model(tmp_path_factory.mktemp("sp") / "teacher", seed=7)


@pytest.fixture(scope="module")
def served(teacher_dir: Path) -> Iterator[tuple[str, Any]]:
    """A teacher on the byte-fallback tokenizer; `app.state.mode` switches it to refuse prompt_logprobs
    ("echo_only") or to add noise to its scores ("noisy")."""
    app = build_app(teacher_dir, served_name="sp", dtype="float32", device="cpu")
    app.state.mode = "plain"

    @app.middleware("http")
    async def modes(request: Request, call_next: Any) -> Any:
        if request.url.path == "/v1/completions" and app.state.mode == "echo_only":
            body = await request.json()
            if "prompt_logprobs" in body:
                return JSONResponse({"error": {"message": "unknown field prompt_logprobs"}}, status_code=400)
        response = await call_next(request)
        if request.url.path == "/v1/completions" and app.state.mode == "noisy":
            import json

            raw = b"".join([chunk async for chunk in response.body_iterator])
            data = json.loads(raw)
            for entry in data["choices"][0].get("prompt_logprobs") or []:
                for value in (entry or {}).values():
                    value["logprob"] -= random.uniform(0.0, 1.0)
            return JSONResponse(data)
        return response

    with serve_asgi(app) as url:
        yield url, app


def student_trajectory(tok: Any, question: str, answer: str, rng: random.Random) -> dict[str, Any]:
    prompt = [{"role": "user", "content": question}]
    text = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    prompt_ids = tok(text, add_special_tokens=False)["input_ids"]
    completion_ids = tok(answer, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
    logprobs = [-rng.uniform(0.05, 4.0) for _ in completion_ids]
    step = {"prompt": prompt, "completion": [{"role": "assistant", "content": answer}],
            "tokens": {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "completion_logprobs": logprobs}}  # fmt: skip
    return {"steps": [step], "advantage": 0.0}


def teacher_text_logprob(model: Any, tok: Any, question: str, answer: str) -> float:
    """log p_teacher(answer + end of turn | the question in the teacher's template), one plain forward pass."""
    prompt = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    ids = tok(prompt + answer, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|end|>")]
    assert ids[: len(prompt_ids)] == prompt_ids
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return sum(float(logprobs[i - 1, ids[i]]) for i in range(len(prompt_ids), len(ids)))


def endpoint(url: str, **extra: Any) -> TeacherEndpointConfig:
    return TeacherEndpointConfig(base_url=url, model="sp", max_retries=0, timeout_s=60, **extra)


async def distill(cfg: TeacherEndpointConfig, student_tok: Any, trajectories: list[dict[str, Any]]) -> tuple[Any, ...]:
    distiller = OnPolicyDistiller(cfg, OnPolicyDistillConfig(), max_concurrency=4, cache_dir=None)
    try:
        await distiller.probe(student_tok)
        samples = [s for t in trajectories for s in render_tokens(t["steps"])]
        kept, metrics = await distiller.apply(samples, trajectories)
        return distiller, samples, kept, metrics
    finally:
        await distiller.aclose()


@pytest.mark.parametrize("protocol", ["prompt_logprobs", "echo"])
def test_cross_tokenizer_sums_equal_a_direct_computation(served: tuple[str, Any], teacher_dir: Path, protocol: str) -> None:
    url, app = served
    app.state.mode = "plain"
    student_tok = build_tiny_tokenizer()
    teacher_tok = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    rng = random.Random(0)
    questions = [f"Reverse the text: {a[::-1]}" for a in ANSWERS]
    trajectories = [student_trajectory(student_tok, q, a, rng) for q, a in zip(questions, ANSWERS, strict=True)]
    cfg = endpoint(url, tokenizer=str(teacher_dir), scoring=protocol)
    distiller, samples, kept, metrics = asyncio.run(distill(cfg, student_tok, trajectories))
    assert distiller.cross is not None and distiller.protocol == protocol and distiller.noise == 0.0
    assert len(kept) == len(samples) == len(ANSWERS) and metrics["distill/teacher_noise"] == 0.0
    for sample, question, answer in zip(kept, questions, ANSWERS, strict=True):
        student_sum = sum(lp for lp, m in zip(sample.logprobs, sample.loss_mask, strict=True) if m)
        assert sample.token_advantages is not None
        got = sum(a for a, m in zip(sample.token_advantages, sample.loss_mask, strict=True) if m)
        assert got == pytest.approx(teacher_text_logprob(model, teacher_tok, question, answer) - student_sum, abs=1e-4)
        assert all(a == 0.0 for a, m in zip(sample.token_advantages, sample.loss_mask, strict=True) if not m)


def test_probe_finds_the_protocol_and_refuses_what_it_cannot_use(served: tuple[str, Any], teacher_dir: Path) -> None:
    url, app = served
    student_tok = build_tiny_tokenizer()
    trajectories = [student_trajectory(student_tok, "Reverse: ab", "ba", random.Random(1))]
    try:
        app.state.mode = "echo_only"  # a server without vLLM's extension: auto falls back to echo
        distiller, _, kept, _ = asyncio.run(distill(endpoint(url, tokenizer=str(teacher_dir)), student_tok, trajectories))
        assert distiller.protocol == "echo" and len(kept) == 1
        with pytest.raises(ConfigError, match="cannot score prompts"):
            asyncio.run(distill(endpoint(url, tokenizer=str(teacher_dir), scoring="prompt_logprobs"), student_tok, []))
        app.state.mode = "noisy"  # replicas that disagree: the self-test stops the run
        with pytest.raises(ConfigError, match="above max_noise = 0.1"):
            asyncio.run(distill(endpoint(url, tokenizer=str(teacher_dir), scoring="prompt_logprobs"), student_tok, []))
    finally:
        app.state.mode = "plain"
    # Another tokenizer and nothing to tokenize with: the error names the key to set.
    with pytest.raises(ConfigError, match=r"set \[orchestrator.teacher_model\] tokenizer"):
        asyncio.run(distill(endpoint(url), student_tok, []))


def test_same_tokenizer_keeps_the_original_path(tmp_path: Path) -> None:
    model_dir = save_tiny_student(tmp_path / "same", seed=2)
    app = build_app(model_dir, served_name="sp", dtype="float32", device="cpu")
    student_tok = AutoTokenizer.from_pretrained(model_dir)
    trajectories = [student_trajectory(student_tok, "Reverse: abc", "cba", random.Random(2))]
    with serve_asgi(app) as url:
        distiller, _, kept, metrics = asyncio.run(distill(endpoint(url), student_tok, trajectories))
    assert distiller.cross is None and distiller.protocol == "prompt_logprobs" and len(kept) == 1
    assert metrics["distill/scored_samples"] == 1 and metrics["distill/teacher_noise"] == 0.0


def test_turns_that_cannot_be_aligned_are_set_aside_by_kind(served: tuple[str, Any], teacher_dir: Path) -> None:
    url, app = served
    app.state.mode = "plain"
    student_tok = build_tiny_tokenizer()
    rng = random.Random(3)
    ok = student_trajectory(student_tok, "Reverse: ab", "ba", rng)
    call = student_trajectory(student_tok, "Compute 2+2", '<tool_call>\n{"name": "calc", "arguments": {"x": "2+2"}}\n</tool_call>', rng)
    call["steps"][0]["completion"] = [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "calc", "arguments": '{"x": "2+2"}'}}]}]  # fmt: skip
    control = student_trajectory(student_tok, "Say it", "the end<|end|> marker", rng)  # the teacher's control text
    _, _, kept, metrics = asyncio.run(distill(endpoint(url, tokenizer=str(teacher_dir)), student_tok, [ok, call, control]))
    assert len(kept) == 1 and metrics["distill/scored_samples"] == 1
    assert metrics["distill/set_aside/tool_call_text"] == 1 and metrics["distill/set_aside/control_token"] == 1
