"""Teacher distributions over loopback HTTP: `apprentice serve` answers prompt_logprobs = k in vLLM's shape and chat
top_logprobs in OpenAI's (exact bytes); the scoring client keeps the top-k and resumes without paying twice; a
teacher that returns -Infinity or -1e30 has its samples set aside, counted, and nothing of it cached; an OpenAI
stand-in's tokens that the student's vocabulary lacks get no soft targets. Tiny fp32 models on CPU."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fault_teacher import serve_asgi
from transformers import AutoModelForCausalLM, AutoTokenizer

from apprentice.clients.openai_client import OpenAIChatClient
from apprentice.clients.scoring import TeacherScoringClient
from apprentice.config import EndpointConfig, SamplingConfig
from apprentice.config.orchestrator import OnPolicyDistillConfig
from apprentice.inference.server import build_app
from apprentice.orchestrator.on_policy import OnPolicyDistiller
from apprentice.orchestrator.soft_targets import StudentVocab, render_with_soft_targets
from apprentice.testing.tiny import save_tiny_student
from apprentice.tokenbytes import vocab_bytes
from apprentice.types import TrainingSample

K = 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_student(tmp_path_factory.mktemp("tiny") / "teacher", seed=3)


@pytest.fixture(scope="module")
def teacher(model_dir: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(base_url, poison): a real fp32 `apprentice serve`; while poison["value"] is set, the last prompt_logprobs
    entry of every token-id scoring request carries that value (written as JSON's -Infinity / NaN where so)."""
    app = build_app(model_dir, served_name="tiny", dtype="float32", device="cpu")
    poison: dict[str, Any] = {"value": None, "served": 0}

    @app.middleware("http")
    async def poisoned(request: Request, call_next: Any) -> Any:
        body = await request.body()
        response = await call_next(request)
        if request.url.path != "/v1/completions" or poison["value"] is None or not isinstance(json.loads(body)["prompt"], list):
            return response
        data = json.loads(b"".join([chunk async for chunk in response.body_iterator]))
        last = data["choices"][0]["prompt_logprobs"][-1]
        prompt_id = str(json.loads(body)["prompt"][-1])
        last[prompt_id]["logprob"] = poison["value"]
        poison["served"] += 1
        return Response(json.dumps(data), media_type="application/json")  # allow_nan: -Infinity, NaN as JSON5 does

    with serve_asgi(app) as url:
        yield url, poison


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> tuple[Any, Any]:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(model_dir)


def sample_of(tokenizer: Any, word: str) -> TrainingSample:
    text = tokenizer.apply_chat_template([{"role": "user", "content": f"Reverse: {word}"}], add_generation_prompt=True, tokenize=False)
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    completion = tokenizer(word[::-1] + "<|im_end|>", add_special_tokens=False)["input_ids"]
    mask = [False] * len(prompt) + [True] * len(completion)
    return TrainingSample(prompt + completion, mask, [-1.0 if m else 0.0 for m in mask])


def direct_logprobs(model: Any, ids: list[int]) -> torch.Tensor:
    """[T-1, V] row i-1: log p(. | ids[:i]) from one plain forward pass."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)


def scorer(url: str, cache_dir: Path | None = None, top_k: int = K) -> TeacherScoringClient:
    return TeacherScoringClient(EndpointConfig(base_url=url, model="tiny", max_retries=0, timeout_s=60), max_concurrency=2,
                                cache_dir=cache_dir, top_k=top_k)  # fmt: skip


def test_serve_prompt_logprobs_give_k_entries_in_vllms_shape(teacher: tuple[str, dict[str, Any]], reference: tuple[Any, Any]) -> None:
    url, _ = teacher
    model, tokenizer = reference
    ids = sample_of(tokenizer, "hello world").token_ids
    body = {"model": "tiny", "prompt": ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": K}
    entries = httpx.post(f"{url}/completions", json=body, timeout=60).json()["choices"][0]["prompt_logprobs"]
    expected = direct_logprobs(model, ids)
    outside = 0
    assert entries[0] is None
    for i in range(1, len(ids)):
        entry, row = entries[i], expected[i - 1]
        top_v, top_i = row.topk(K)
        rank = int((row > row[ids[i]]).sum()) + 1
        assert {k for k, v in entry.items() if v["rank"] <= K} == {str(t) for t in top_i.tolist()}
        assert len(entry) == (K if rank <= K else K + 1) and entry[str(ids[i])]["rank"] == rank  # vLLM's extra key
        assert abs(entry[str(ids[i])]["logprob"] - float(row[ids[i]])) < 1e-4
        outside += rank > K
    assert outside > 0, "expected a prompt token outside the teacher's top-k (a random tiny teacher has many)"


def test_top_k_scores_are_the_teachers_and_a_resumed_run_pays_nothing(teacher: tuple[str, dict[str, Any]],
                                                                       reference: tuple[Any, Any], tmp_path: Path) -> None:  # fmt: skip
    url, _ = teacher
    model, tokenizer = reference
    samples = [sample_of(tokenizer, w) for w in ("abc", "hello")]

    async def run(cache: Path) -> tuple[list[TrainingSample], dict[str, float]]:
        distiller = OnPolicyDistiller(EndpointConfig(base_url=url, model="tiny", max_retries=0),
                                      OnPolicyDistillConfig(top_k=K), max_concurrency=2, cache_dir=cache)  # fmt: skip
        try:
            fresh = [TrainingSample(s.token_ids, s.loss_mask, s.logprobs) for s in samples]
            return await distiller.apply(fresh)
        finally:
            await distiller.aclose()

    kept, metrics = asyncio.run(run(tmp_path / "cache"))
    assert len(kept) == 2 and metrics["distill/requests"] == 2 and metrics["distill/responses"] == 2
    mass = []
    for s in kept:
        assert s.teacher_topk_ids is not None and s.teacher_topk_logprobs is not None and s.token_advantages is None
        expected = direct_logprobs(model, s.token_ids)
        for t, m in enumerate(s.loss_mask):
            if not m:
                assert s.teacher_topk_ids[t] == [-1] * K
                continue
            top_v, top_i = expected[t - 1].topk(K)
            assert s.teacher_topk_ids[t] == top_i.tolist()
            assert max(abs(a - b) for a, b in zip(s.teacher_topk_logprobs[t], top_v.tolist(), strict=True)) < 1e-4
            mass.append(float(top_v.exp().sum()))
    assert abs(metrics["distill/topk_mass"] - sum(mass) / len(mass)) < 1e-4

    again, metrics = asyncio.run(run(tmp_path / "cache"))  # a resumed run: every score from the cache
    assert metrics["distill/requests"] == 0 and metrics["distill/cache_hits"] == 2
    assert [(s.teacher_topk_ids, s.teacher_topk_logprobs) for s in again] == [(s.teacher_topk_ids, s.teacher_topk_logprobs) for s in kept]


@pytest.mark.parametrize(("value", "kind"), [(-math.inf, "nonfinite_logprob"), (-1e30, "absurd_logprob")])
def test_a_teacher_returning_minus_infinity_or_minus_1e30_is_set_aside_and_never_cached(
    teacher: tuple[str, dict[str, Any]], reference: tuple[Any, Any], tmp_path: Path, value: float, kind: str
) -> None:
    url, poison = teacher
    _, tokenizer = reference
    cache = tmp_path / "teacher_cache"

    async def run(top_k: int) -> tuple[list[TrainingSample], dict[str, float]]:
        distiller = OnPolicyDistiller(EndpointConfig(base_url=url, model="tiny", max_retries=0),
                                      OnPolicyDistillConfig(top_k=top_k), max_concurrency=2, cache_dir=cache)  # fmt: skip
        try:
            return await distiller.apply([sample_of(tokenizer, w) for w in ("abc", "hello")])
        finally:
            await distiller.aclose()

    poison["value"] = value
    try:
        for top_k in (0, K):
            kept, metrics = asyncio.run(run(top_k))
            assert kept == [] and metrics[f"distill/set_aside/{kind}"] == 2 and metrics[f"distill/errors/{kind}"] == 2
    finally:
        poison["value"] = None
    assert not list(cache.rglob("*.json")), "a bad teacher answer reached the cache"
    kept, metrics = asyncio.run(run(0))  # the teacher is fixed: the rerun scores and caches
    assert len(kept) == 2 and metrics["distill/requests"] == 2
    for path in cache.rglob("*.json"):
        stored = json.loads(path.read_text())["response"]["logprobs"]
        assert all(v is None or (math.isfinite(v) and v >= -1000) for v in stored)


def test_chat_top_logprobs_from_serve_carry_exact_bytes_and_are_cached(teacher: tuple[str, dict[str, Any]],
                                                                       reference: tuple[Any, Any], tmp_path: Path) -> None:  # fmt: skip
    url, _ = teacher
    _, tokenizer = reference
    endpoint = EndpointConfig(base_url=url, model="tiny", max_retries=0)
    messages = [{"role": "user", "content": "Reverse: hello"}]

    def client(top_logprobs: int) -> OpenAIChatClient:
        sampling = SamplingConfig(max_tokens=12, temperature=1.0, seed=7, top_logprobs=top_logprobs)
        return OpenAIChatClient(endpoint, sampling, max_concurrency=1, use_token_client=False, cache_dir=tmp_path)

    assert "logprobs" not in client(0).build_request(messages, None) and "top_logprobs" not in client(0).build_request(messages, None)
    assert client(K).build_request(messages, None)["top_logprobs"] == K

    async def ask() -> Any:
        c = client(K)
        try:
            return await c.chat(messages, key="k"), c.metrics()
        finally:
            await c.aclose()

    response, metrics = asyncio.run(ask())
    tokens = response.token_logprobs
    assert tokens and metrics["teacher/requests"] == 1
    assert all(len(t["top"]) == K and t["top"][0][1] >= t["top"][-1][1] for t in tokens)
    # Each token's bytes name exactly one vocabulary entry, and those ids decode to the answer (a random tiny
    # model writes byte tokens that are no text alone: decode([id]) alone would have made them U+FFFD).
    vocab = StudentVocab(tokenizer)
    ids = [vocab.one(t["bytes"]) for t in tokens]
    ordinary = [i for i in ids if i is not None]
    assert len(ordinary) >= len(ids) - 1  # at most the final end-of-turn token, a special token, maps to none
    assert tokenizer.decode(ordinary, skip_special_tokens=True) == response.message["content"]
    again, metrics = asyncio.run(ask())
    assert again.token_logprobs == tokens and metrics["teacher/cache_hits"] == 1 and metrics["teacher/requests"] == 0


def openai_stand_in(content: list[tuple[str, float, list[tuple[str, float]]]]) -> FastAPI:
    """A hosted chat API stand-in: one fixed answer whose logprobs name each token by its UTF-8 bytes."""
    app = FastAPI()

    def item(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> JSONResponse:
        body = await request.json()
        assert body["logprobs"] is True and body["top_logprobs"] == 2
        logprobs = {"content": [{**item(t, lp), "top_logprobs": [item(a, alp) for a, alp in top]} for t, lp, top in content],
                    "refusal": None}  # fmt: skip
        message = {"role": "assistant", "content": "".join(t for t, _, _ in content)}
        return JSONResponse({"id": "x", "object": "chat.completion", "model": body["model"], "usage": {"prompt_tokens": 5, "completion_tokens": len(content)},
                             "choices": [{"index": 0, "message": message, "finish_reason": "stop", "logprobs": logprobs}]})  # fmt: skip

    return app


def test_openai_top_logprobs_with_tokens_the_student_lacks(reference: tuple[Any, Any], tmp_path: Path) -> None:
    _, tokenizer = reference
    vocab = StudentVocab(tokenizer)
    table = vocab_bytes(tokenizer)
    words = [table[i].decode() for i in tokenizer("Reverse the text", add_special_tokens=False)["input_ids"]]  # type: ignore[union-attr]
    other = [table[i].decode() for i in (300, 301)]  # type: ignore[union-attr]
    assert vocab.one(list("東京".encode())) is None  # the tiny vocabulary splits it into bytes
    ok = [(w, -0.1, [(w, -0.1), (other[0], -2.5)]) for w in words]
    cases = {"maps": ok, "alternative": [ok[0], (words[1], -0.2, [(words[1], -0.2), ("東京", -1.9)]), *ok[2:]],
             "token": [*ok, ("東京", -0.3, [("東京", -0.3), (other[1], -1.5)])]}  # fmt: skip
    coverage = {}
    messages = [{"role": "user", "content": "Say ok"}]
    for name, content in cases.items():
        with serve_asgi(openai_stand_in(content)) as url:

            async def ask(url: str = url) -> Any:
                client = OpenAIChatClient(EndpointConfig(base_url=url, model="hosted"), SamplingConfig(max_tokens=16, top_logprobs=2),
                                          max_concurrency=1, use_token_client=False, cache_dir=None)  # fmt: skip
                try:
                    return await client.chat(messages)
                finally:
                    await client.aclose()

            response = asyncio.run(ask())
        trajectory = {"steps": [{"prompt": messages, "completion": [response.message],
                                 "teacher_logprobs": response.token_logprobs}], "tools": None}  # fmt: skip
        samples, _, cov = render_with_soft_targets([trajectory], tokenizer, vocab, 2)
        coverage[name] = cov.metrics()
        assert len(samples) == 1 and samples[0].teacher_topk_ids is not None
    assert coverage["maps"]["distill/topk/covered_fraction"] == len(words) / (len(words) + 1)  # all but <|im_end|>
    assert coverage["alternative"]["distill/topk/uncovered/unmapped_alternative"] == 1
    assert coverage["token"]["distill/topk/uncovered/unmapped_token"] >= 1
    assert coverage["token"]["distill/topk/covered_fraction"] < coverage["maps"]["distill/topk/covered_fraction"]


@pytest.mark.slow  # two `apprentice rl` runs (server, orchestrator, trainer): minutes on a loaded 2-core machine
def test_apprentice_rl_with_a_poisoned_teacher_stops_clean_and_a_rerun_with_it_fixed_trains(
    teacher: tuple[str, dict[str, Any]], model_dir: Path, tmp_path: Path
) -> None:
    """Issue 19's row: a scoring teacher answering -Infinity / -1e30 used to be written to rollouts/ and cached,
    so every rerun failed the same way. Now the step stops naming the kinds, nothing absurd is on disk, and the
    rerun against the fixed teacher trains."""
    import os
    import subprocess
    import sys

    from apprentice.inference.launch import free_port
    from apprentice.metrics import read_metrics

    url, poison = teacher
    output = tmp_path / "run"
    config = tmp_path / "opd.toml"
    config.write_text(f"""
output_dir = "{output}"
[model]
name = "{model_dir}"
[inference]
port = {free_port()}
threads = 1
[orchestrator]
batch_size = 2
max_async_level = 0
truncated = "keep"
[orchestrator.teacher_model]
base_url = "{url}"
model = "tiny"
max_retries = 0
[orchestrator.sampling]
max_tokens = 6
[[orchestrator.env]]
id = "reverse-text"
[trainer]
max_steps = 1
micro_batch_tokens = 1024
[trainer.loss]
type = "rl"
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "apprentice", "rl", str(config)], env=env, capture_output=True,
                              text=True, timeout=300)  # fmt: skip

    poison["value"] = -math.inf
    try:
        first = run()
    finally:
        poison["value"] = None
    said = first.stdout + first.stderr
    assert first.returncode != 0 and "nonfinite_logprob" in said and url in said, said[-3000:]
    assert not list((output / "rollouts").glob("step_*")), "a step with the teacher's -Infinity was written"
    for path in (output / "teacher_cache").rglob("*.json"):
        stored = json.loads(path.read_text())["response"].get("logprobs") or []
        assert all(v is None or (math.isfinite(v) and v >= -1000) for v in stored)

    second = run()
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    (step,) = read_metrics(output / "trainer" / "metrics.jsonl")
    assert step["step"] == 1 and math.isfinite(step["loss/pg"]) and step["loss/tokens"] > 0


def test_top_k_above_what_the_teacher_returns_is_refused_at_startup(teacher: tuple[str, dict[str, Any]],
                                                                    reference: tuple[Any, Any]) -> None:  # fmt: skip
    from apprentice.clients.echo import EchoScoringClient
    from apprentice.config import ConfigError, TeacherEndpointConfig
    from apprentice.crosstok.probe import probe_teacher

    def check_teacher_tokenizer(client: TeacherScoringClient, tokenizer: Any, _: str) -> Any:
        """The startup probe (tokenizer, top-k width, protocol, self-test) through the given scoring client."""
        endpoint = TeacherEndpointConfig.model_validate(client.endpoint.model_dump())
        return probe_teacher(endpoint, client, EchoScoringClient(endpoint, max_concurrency=1, cache_dir=None), tokenizer)

    url, _ = teacher
    _, tokenizer = reference
    asyncio.run(check_teacher_tokenizer(scorer(url), tokenizer, "student"))  # k = 3: fine
    with pytest.raises(ConfigError) as info:  # serve answers at most 20, like vLLM's default --max-logprobs
        asyncio.run(check_teacher_tokenizer(scorer(url, top_k=21), tokenizer, "student"))
    assert "orchestrator.on_policy_distill.top_k = 21" in str(info.value) and "lower top_k" in str(info.value)

    narrow = FastAPI()  # a server that quietly returns the prompt token alone, whatever k is asked

    @narrow.post("/v1/completions")
    async def completions(request: Request) -> JSONResponse:
        body = await request.json()
        ids = tokenizer(body["prompt"])["input_ids"]
        entries = [None] + [{str(t): {"logprob": -1.0, "rank": 1}} for t in ids[1:]]
        return JSONResponse({"choices": [{"prompt_logprobs": entries, "prompt_token_ids": ids}]})

    with serve_asgi(narrow) as narrow_url, pytest.raises(ConfigError) as info:
        asyncio.run(check_teacher_tokenizer(scorer(narrow_url), tokenizer, "student"))
    assert "returned at most 1 candidates per position" in str(info.value)


def test_off_policy_probe_refuses_a_teacher_whose_tokens_do_not_map_or_that_returns_fewer_alternatives(
    reference: tuple[Any, Any],
) -> None:
    from apprentice.errors import UsageError
    from apprentice.orchestrator.soft_targets import probe_top_logprobs

    _, tokenizer = reference
    vocab = StudentVocab(tokenizer)
    foreign = [("東京", -0.1, [("東京", -0.1), ("大阪", -2.5)]), ("では", -0.2, [("では", -0.2), ("には", -1.9)])]
    narrow = [("東京", -0.1, [("東京", -0.1)])]
    table = vocab_bytes(tokenizer)
    word = table[tokenizer("Reverse", add_special_tokens=False)["input_ids"][0]].decode()  # type: ignore[union-attr]
    fine = [(word, -0.1, [(word, -0.1), ("東京", -2.5)])]
    outcomes = {}
    for name, content in (("foreign", foreign), ("narrow", narrow), ("fine", fine)):
        with serve_asgi(openai_stand_in(content)) as url:

            async def probe(url: str = url) -> str:
                client = OpenAIChatClient(EndpointConfig(base_url=url, model="hosted"), SamplingConfig(max_tokens=16, top_logprobs=2),
                                          max_concurrency=1, use_token_client=False, cache_dir=None)  # fmt: skip
                try:
                    await probe_top_logprobs(client, vocab, 2, url)
                except UsageError as e:
                    return str(e)
                finally:
                    await client.aclose()
                return "ok"

            outcomes[name] = asyncio.run(probe())
    assert "none of the 2 tokens" in outcomes["foreign"] and "orchestrator.sampling.top_logprobs = 2" in outcomes["foreign"]
    assert "at most 1 alternatives" in outcomes["narrow"]
    assert outcomes["fine"] == "ok"
