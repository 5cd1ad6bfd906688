"""Teacher scoring for on-policy distillation, through a real `apprentice serve` on loopback (tiny model, fp32):
prompt logprobs equal a direct transformers forward pass, hidden prompts are honoured, the client's retry policy
and cache apply (a resumed run pays nothing). The startup probe and other tokenizers: test_crosstok_scoring.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi import Request
from fastapi.responses import JSONResponse
from fault_teacher import serve_asgi
from transformers import AutoModelForCausalLM, AutoTokenizer

from apprentice.clients.base import ClientError
from apprentice.clients.scoring import TeacherScoringClient
from apprentice.config import EndpointConfig
from apprentice.inference.server import build_app
from apprentice.testing.tiny import save_tiny_student

CONVERSATION = [{"role": "user", "content": "Reverse the text: hello world"}]
HIDDEN = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Reverse: ab"},
          {"role": "assistant", "content": "ba"}]  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_student(tmp_path_factory.mktemp("tiny") / "teacher", seed=3)


@pytest.fixture(scope="module")
def teacher(model_dir: Path) -> Iterator[tuple[str, Any]]:
    """(base_url, app) of a plain fp32 teacher whose first two /v1/completions requests fail with 503."""
    app = build_app(model_dir, served_name="tiny", dtype="float32", device="cpu")
    failures = {"left": 0}

    @app.middleware("http")
    async def flaky(request: Request, call_next: Any) -> Any:
        if request.url.path == "/v1/completions" and failures["left"] > 0:
            failures["left"] -= 1
            return JSONResponse({"error": {"message": "overloaded", "type": "server_error"}}, status_code=503)
        return await call_next(request)

    app.state.failures = failures
    with serve_asgi(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> tuple[Any, Any]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def direct_logprobs(model: Any, ids: list[int]) -> list[float]:
    """[T-1] logprob of ids[i] after ids[:i] for i >= 1, from one plain transformers forward pass in fp32."""
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return [float(logprobs[i - 1, ids[i]]) for i in range(1, len(ids))]


def sample_ids(tokenizer: Any, conversation: list[dict[str, Any]], completion: str) -> tuple[list[int], list[bool]]:
    """A student sample: the rendered prompt plus a completion and its end-of-turn, with its loss mask."""
    text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion + "<|im_end|>", add_special_tokens=False)["input_ids"]
    return prompt + completion_ids, [False] * len(prompt) + [True] * len(completion_ids)


def client(url: str, cache_dir: Path | None = None) -> TeacherScoringClient:
    endpoint = EndpointConfig(base_url=url, model="tiny", max_retries=3, timeout_s=60)
    return TeacherScoringClient(endpoint, max_concurrency=4, cache_dir=cache_dir, backoff_base_s=0.01, jitter_seed=0)


def test_prompt_logprobs_equal_a_direct_forward_pass(teacher: tuple[str, Any], reference: tuple[Any, Any]) -> None:
    url, _ = teacher
    model, tokenizer = reference
    ids, mask = sample_ids(tokenizer, CONVERSATION, "dlrow olleh")
    scores = asyncio.run(client(url).score(ids))
    assert scores.logprobs[0] is None and all(lp is not None for lp in scores.logprobs[1:])
    expected = direct_logprobs(model, ids)
    assert max(abs(a - b) for a, b in zip(scores.logprobs[1:], expected, strict=True)) < 1e-4  # type: ignore[operator]

    per_token = asyncio.run(client(url).score_sample(ids, mask)).logprobs
    assert [lp for lp, m in zip(per_token, mask, strict=True) if not m] == [0.0] * mask.count(False)
    trained = [i for i, m in enumerate(mask) if m]
    assert max(abs(per_token[i] - expected[i - 1]) for i in trained) < 1e-4

    # The raw vLLM shape: token id keys, the prompt token plus k alternatives with ranks, one generated token.
    body = {"model": "tiny", "prompt": ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 2, "return_token_ids": True}
    data = httpx.post(f"{url}/completions", json=body, timeout=60).json()
    (choice,) = data["choices"]
    assert choice["prompt_token_ids"] == ids and len(choice["token_ids"]) == 1 and data["usage"]["prompt_tokens"] == len(ids)
    entry = choice["prompt_logprobs"][3]
    assert str(ids[3]) in entry and 1 <= len(entry) <= 3
    assert sorted(v["rank"] for k, v in entry.items() if k != str(ids[3]))[:2] == [1, 2]
    assert abs(entry[str(ids[3])]["logprob"] - expected[2]) < 1e-4


def test_hidden_prompt_is_scored_as_the_teacher_sees_the_conversation(model_dir: Path, reference: tuple[Any, Any]) -> None:
    model, tokenizer = reference
    app = build_app(model_dir, served_name="tiny", dtype="float32", device="cpu", prompt_prefix=HIDDEN)
    ids, mask = sample_ids(tokenizer, CONVERSATION, "dlrow olleh")
    teacher_view, _ = sample_ids(tokenizer, HIDDEN + CONVERSATION, "dlrow olleh")
    with serve_asgi(app) as url:
        per_token = asyncio.run(client(url).score_sample(ids, mask)).logprobs
    expected = direct_logprobs(model, teacher_view)
    offset = len(teacher_view) - len(ids)
    trained = [i for i, m in enumerate(mask) if m]
    assert max(abs(per_token[i] - expected[i + offset - 1]) for i in trained) < 1e-4
    plain = direct_logprobs(model, ids)
    assert max(abs(per_token[i] - plain[i - 1]) for i in trained) > 1e-3  # the hidden prompt did change the scores


def test_retries_counted_and_a_resumed_run_pays_nothing(teacher: tuple[str, Any], reference: tuple[Any, Any],
                                                        tmp_path: Path) -> None:  # fmt: skip
    url, app = teacher
    _, tokenizer = reference
    samples = [sample_ids(tokenizer, [{"role": "user", "content": f"Reverse: {w}"}], w[::-1]) for w in ("abc", "hello", "fox")]

    async def score_all(c: TeacherScoringClient) -> list[list[float]]:
        return [r.logprobs for r in await asyncio.gather(*(c.score_sample(ids, mask) for ids, mask in samples))]

    app.state.failures["left"] = 2
    first = client(url, tmp_path / "teacher_cache")
    paid = asyncio.run(score_all(first))
    m = first.metrics()
    assert m["distill/requests"] == 5 and m["distill/retries"] == 2 and m["distill/retries/server"] == 2
    assert m["distill/responses"] == 3 and m["distill/cache_hits"] == 0

    resumed = client(url, tmp_path / "teacher_cache")  # a new process on the same output directory
    again = asyncio.run(score_all(resumed))
    m = resumed.metrics()
    assert again == paid and m["distill/cache_hits"] == 3 and m["distill/requests"] == 0

    # A damaged entry (wrong shape) is a miss: asked again and replaced, the others still hit.
    damaged = resumed._cache.path_for(resumed.build_score_request(samples[1][0]), "")  # type: ignore[union-attr]
    entry = json.loads(damaged.read_text())
    damaged.write_text(json.dumps({**entry, "response": {"logprobs": "not a list"}}))
    third = client(url, tmp_path / "teacher_cache")
    assert asyncio.run(score_all(third)) == paid
    m = third.metrics()
    assert m["distill/cache_hits"] == 2 and m["distill/requests"] == 1
    assert json.loads(damaged.read_text())["response"]["logprobs"][0] is None


def test_identical_samples_scored_at_once_pay_one_request(teacher: tuple[str, Any], reference: tuple[Any, Any],
                                                          tmp_path: Path) -> None:  # fmt: skip
    """A GRPO group's four identical answers are scored at the same moment, before any answer is cached: one
    request, four equal scores; an error reaches every copy, and a later identical request asks again."""
    url, app = teacher
    model, tokenizer = reference
    ids, mask = sample_ids(tokenizer, CONVERSATION, "dlrow olleh")
    other, other_mask = sample_ids(tokenizer, CONVERSATION, "olleh")

    async def group(c: TeacherScoringClient) -> list[Any]:
        return await asyncio.gather(*(c.score_sample(i, m) for i, m in [(ids, mask)] * 4 + [(other, other_mask)]),
                                    return_exceptions=True)  # fmt: skip

    first = client(url, tmp_path / "teacher_cache")
    scores = asyncio.run(group(first))
    m = first.metrics()
    assert m["distill/requests"] == 2 and m["distill/shared_requests"] == 3 and m["distill/cache_hits"] == 0
    assert all(s.logprobs == scores[0].logprobs for s in scores[:4]) and scores[4].logprobs != scores[0].logprobs
    expected = direct_logprobs(model, ids)
    assert all(abs(a - b) < 1e-4 for a, b, t in zip(scores[0].logprobs[1:], expected, mask[1:], strict=True) if t)

    async def fail_then_recover(c: TeacherScoringClient) -> tuple[list[Any], Any]:
        app.state.failures["left"] = 10  # more 503s than max_retries = 3: every copy gets the one error
        failed = await group(c)
        app.state.failures["left"] = 0
        return failed, await c.score_sample(ids, mask)  # nothing failed is remembered: asked again

    down = client(url, tmp_path / "cold")
    failed, recovered = asyncio.run(fail_then_recover(down))
    assert all(isinstance(e, ClientError) and e.kind == "server" for e in failed[:4])
    assert down.metrics()["distill/shared_requests"] == 3 and recovered.logprobs == scores[0].logprobs


def test_errors_are_counted_by_kind(teacher: tuple[str, Any]) -> None:
    url, app = teacher

    async def run() -> tuple[ClientError, ClientError, dict[str, float]]:
        c = client(url)
        with pytest.raises(ClientError) as bad:  # a token id outside the vocabulary: a 400, not retried
            await c.score([1, 2, 10**6])
        app.state.failures["left"] = 10  # more 503s than max_retries = 3
        with pytest.raises(ClientError) as down:
            await c.score([1, 2, 3])
        app.state.failures["left"] = 0
        return bad.value, down.value, c.metrics()

    bad, down, m = asyncio.run(run())
    assert bad.kind == "bad_request" and "prompt token ids must be in" in str(bad)
    assert down.kind == "server" and m["distill/errors/server"] == 1 and m["distill/errors/bad_request"] == 1
    assert m["distill/retries"] == 3


def test_distiller_sets_token_advantages_and_sets_aside_unscorable_samples(teacher: tuple[str, Any],
                                                                           reference: tuple[Any, Any]) -> None:  # fmt: skip
    from apprentice.config.orchestrator import OnPolicyDistillConfig
    from apprentice.orchestrator.on_policy import OnPolicyDistiller
    from apprentice.types import TrainingSample

    url, _ = teacher
    model, tokenizer = reference
    samples = []
    for word, student_lp in (("abc", -1.0), ("hello", -2.0)):
        ids, mask = sample_ids(tokenizer, [{"role": "user", "content": f"Reverse: {word}"}], word[::-1])
        samples.append(TrainingSample(ids, mask, [student_lp if m else 0.0 for m in mask], advantage=0.5))
    broken = TrainingSample([1, 2, 10**6], [False, True, True], [0.0, -1.0, -1.0], advantage=0.5)

    first_errors: dict[str, str] = {}

    async def run() -> tuple[list[TrainingSample], dict[str, float]]:
        distiller = OnPolicyDistiller(EndpointConfig(base_url=url, model="tiny", max_retries=0),
                                      OnPolicyDistillConfig(kl_coef=1.0, reward_coef=2.0), max_concurrency=2, cache_dir=None)  # fmt: skip
        try:
            return await distiller.apply([samples[0], broken, samples[1]])
        finally:
            first_errors.update(distiller.first_errors)
            await distiller.aclose()

    kept, metrics = asyncio.run(run())
    assert kept == [samples[0], samples[1]] and metrics["distill/set_aside/bad_request"] == 1
    # The teacher's own text of the first failure per kind, for the "none of the N rollouts" message.
    assert list(first_errors) == ["bad_request"] and "400" in first_errors["bad_request"]
    total, count = 0.0, 0
    for s in kept:
        teacher_lps = direct_logprobs(model, s.token_ids)
        assert s.token_advantages is not None
        for i, m in enumerate(s.loss_mask):
            expected = (teacher_lps[i - 1] - s.logprobs[i]) + 2.0 * 0.5 if m else 0.0
            assert abs(s.token_advantages[i] - expected) < 1e-4
            if m:
                total, count = total + s.logprobs[i] - teacher_lps[i - 1], count + 1
    assert metrics["distill/scored_tokens"] == count and abs(metrics["distill/reverse_kl"] - total / count) < 1e-4
    assert metrics["distill/scored_samples"] == 2 and metrics["distill/errors/bad_request"] == 1


def test_completions_without_prompt_logprobs_generate_through_the_engine(teacher: tuple[str, Any],
                                                                         reference: tuple[Any, Any]) -> None:  # fmt: skip
    url, _ = teacher
    model, tokenizer = reference
    ids, _ = sample_ids(tokenizer, CONVERSATION, "")
    ids = ids[:-1]  # the prompt up to the assistant header
    body = {"model": "tiny", "prompt": ids, "max_tokens": 4, "temperature": 0, "return_token_ids": True}
    (choice,) = httpx.post(f"{url}/completions", json=body, timeout=60).json()["choices"]
    greedy, context = [], list(ids)
    with torch.no_grad():
        for _ in range(len(choice["token_ids"])):
            greedy.append(int(model(torch.tensor([context])).logits[0, -1].argmax()))
            context.append(greedy[-1])
    assert choice["token_ids"] == greedy and choice["prompt_logprobs"] is None and 1 <= len(greedy) <= 4
    for bad, param in (({"max_tokens": 0}, "max_tokens"), ({"prompt_logprobs": 0, "max_tokens": 2}, "max_tokens"),
                       ({"prompt": []}, "prompt"), ({"prompt_logprobs": 21}, "prompt_logprobs")):  # fmt: skip
        response = httpx.post(f"{url}/completions", json={**body, **bad}, timeout=60)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, (bad, response.text)


def test_a_spend_cap_on_the_scoring_teacher_counts_every_answer_and_then_sends_nothing(
    teacher: tuple[str, Any], reference: tuple[Any, Any], tmp_path: Path
) -> None:
    """`[orchestrator.teacher_model] max_tokens_total` bounds what on-policy distillation pays: every scoring answer
    is charged (a 503 is not), cache hits stay free, and once the cap is reached no request leaves: the distiller
    raises SpendCapReached (the run stops cleanly) instead of setting the samples aside."""
    from apprentice.config.orchestrator import OnPolicyDistillConfig
    from apprentice.orchestrator.on_policy import OnPolicyDistiller
    from apprentice.orchestrator.spend import SpendCapReached, SpendLedger
    from apprentice.types import TrainingSample

    url, app = teacher
    _, tokenizer = reference
    samples = []
    for word in ("abc", "hello", "fox", "owl"):
        ids, mask = sample_ids(tokenizer, [{"role": "user", "content": f"Reverse: {word}"}], word[::-1])
        samples.append(TrainingSample(ids, mask, [-1.0 if m else 0.0 for m in mask], advantage=0.0))
    cost = [len(s.token_ids) + 1 for s in samples]  # apprentice serve bills the prompt and its one generated token

    def ledger(cap: int) -> SpendLedger:
        return SpendLedger(tmp_path / "usage.json", EndpointConfig(base_url=url, model="tiny", max_tokens_total=cap),
                           "orchestrator.teacher_model")  # fmt: skip

    async def apply(spend: SpendLedger, batch: list[TrainingSample]) -> tuple[list[TrainingSample], dict[str, float]]:
        distiller = OnPolicyDistiller(EndpointConfig(base_url=url, model="tiny", max_retries=3), OnPolicyDistillConfig(),
                                      max_concurrency=1, cache_dir=tmp_path / "cache", budget=spend)  # fmt: skip
        distiller.client._session.backoff_base_s = 0.01
        try:
            return await distiller.apply(batch)
        finally:
            await distiller.aclose()

    spend = ledger(cost[0] + cost[1] + 1)
    app.state.failures["left"] = 2  # two 503s first: retried, never billed
    kept, metrics = asyncio.run(apply(spend, samples[:2]))
    assert len(kept) == 2 and metrics["distill/retries"] == 2
    assert spend.total.total_tokens == cost[0] + cost[1] == metrics["distill/prompt_tokens"] + 2

    # One token of budget left: the next request goes out (the cap is checked before sending), the one after not.
    with pytest.raises(SpendCapReached, match=r"orchestrator\.teacher_model\.max_tokens_total"):
        asyncio.run(apply(spend, samples[2:]))
    assert spend.total.total_tokens == cost[0] + cost[1] + cost[2]

    kept, metrics = asyncio.run(apply(spend, samples[:3]))  # all three answers paid for are cached: free
    assert len(kept) == 3 and metrics["distill/requests"] == 0 and metrics["distill/cache_hits"] == 3
    assert spend.total.total_tokens == sum(cost[:3])


@pytest.mark.parametrize("answer", [
    {"usage": {"prompt_tokens": "n/a"}},
    {"usage": {"prompt_tokens": [3]}},
    {"usage": {"prompt_tokens": float("inf"), "completion_tokens": 1e999}},
    {"prompt_token_ids": [None, 5, 6]},
], ids=["usage-string", "usage-list", "usage-infinite", "ids-null"])  # fmt: skip
def test_a_garbled_usage_or_id_list_in_a_scoring_answer_never_crashes_the_run(tmp_path: Path, answer: dict[str, Any]) -> None:
    """Python's json reads 1e999 as inf; a usage count that is a string, a list or infinite counts as 0 (a capped
    run still charges the rest), and a null in `prompt_token_ids` sets the sample aside as malformed. Before,
    each raised a TypeError/ValueError/OverflowError that stopped the orchestrator on every rerun."""
    from fastapi import FastAPI, Response

    from apprentice.orchestrator.spend import SpendLedger

    app = FastAPI()

    @app.post("/v1/completions")
    async def completions() -> Response:
        entries = [None, {"5": {"logprob": -0.5, "rank": 1}}, {"6": {"logprob": -0.25, "rank": 1}}]
        body = {"choices": [{"prompt_logprobs": entries, "text": "x"}], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
        return Response(json.dumps({**body, **answer}), media_type="application/json")  # inf goes out as Infinity

    spend = SpendLedger(tmp_path / "usage.json", EndpointConfig(base_url="http://127.0.0.1:9/v1", model="t", max_tokens_total=100))
    with serve_asgi(app) as url:
        scorer = TeacherScoringClient(EndpointConfig(base_url=url, model="t", max_retries=0), max_concurrency=1,
                                      cache_dir=None, budget=spend)  # fmt: skip

        async def score() -> Any:
            try:
                return await scorer.score([4, 5, 6])
            finally:
                await scorer.aclose()

        if "prompt_token_ids" in answer:
            with pytest.raises(ClientError) as info:
                asyncio.run(score())
            assert info.value.kind == "malformed" and "prompt_token_ids" in str(info.value)
        else:
            assert asyncio.run(score()).logprobs == [None, -0.5, -0.25]
    assert spend.total.total_tokens <= 4
