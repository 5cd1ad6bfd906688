"""`apprentice serve` over the tiny fixture model: real uvicorn on loopback, the official openai client against it."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from fault_teacher import serve_asgi
from transformers import AutoModelForCausalLM, AutoTokenizer

from apprentice.inference.server import build_app
from apprentice.testing.tiny import save_tiny_student

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse the text: hello"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_student(tmp_path_factory.mktemp("tiny") / "student")


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[tuple[str, Any]]:
    """(base_url, app) of one server shared by the tests that do not change its state."""
    app = build_app(model_dir, served_name="tiny", max_batch_size=8, batch_window_s=0.05)
    with serve_asgi(app) as url:
        yield url, app


def client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)


def forward_logprobs(model: Any, prompt_ids: list[int], completion_ids: list[int]) -> list[float]:
    """Logprob of each completion id under a plain (unpadded, uncached) forward pass."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    return [float(logprobs[len(prompt_ids) - 1 + i, t]) for i, t in enumerate(completion_ids)]


def post_concurrently(url: str, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chat requests sent at once; their JSON answers in order."""

    async def send() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(timeout=60) as c:
            responses = await asyncio.gather(*(c.post(f"{url}/chat/completions", json=r) for r in requests))
        return [r.json() for r in responses]

    return asyncio.run(send())


def test_models_and_non_streaming(server: tuple[str, Any]) -> None:
    url, _ = server
    c = client(url)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    r = c.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)  # type: ignore[arg-type]
    (choice,) = r.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length") and choice.logprobs is None
    assert r.usage is not None and r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 10
    assert r.model_extra is not None and "prompt_token_ids" not in r.model_extra  # only when asked


def test_streaming_matches_non_streaming_and_ends_with_done(server: tuple[str, Any]) -> None:
    url, _ = server
    c = client(url)
    # Seeded sampling (the greedy output of the random tiny model is one repeated token: too easy to match).
    kwargs: dict[str, Any] = {"model": "tiny", "messages": MESSAGES, "max_tokens": 16, "temperature": 1.0, "seed": 11}
    expected = c.chat.completions.create(**kwargs).choices[0]
    chunks = list(c.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    pieces = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
    assert len(pieces) > 3 and "".join(pieces) == expected.message.content  # token by token, same text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == expected.finish_reason
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1

    with httpx.stream("POST", f"{url}/chat/completions", json={**kwargs, "stream": True}, timeout=60) as raw:
        assert raw.headers["content-type"].startswith("text/event-stream")
        events = [line for line in raw.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_n_and_seed(server: tuple[str, Any]) -> None:
    url, _ = server
    c = client(url)
    kwargs: dict[str, Any] = {"model": "tiny", "messages": MESSAGES, "max_tokens": 8, "temperature": 1.0, "seed": 7}
    first = c.chat.completions.create(**kwargs, n=2)
    assert [ch.index for ch in first.choices] == [0, 1]
    texts = [ch.message.content for ch in first.choices]
    assert texts[0] != texts[1]  # choice k is seeded with seed + k
    again = c.chat.completions.create(**kwargs, n=2)
    assert [ch.message.content for ch in again.choices] == texts


def test_logprobs_and_token_ids_match_the_tokenizer_and_model(server: tuple[str, Any], model_dir: Path) -> None:
    url, _ = server
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    r = client(url).chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=10, temperature=1.0, seed=3, logprobs=True, top_logprobs=3,  # type: ignore[arg-type]
        extra_body={"return_token_ids": True},
    )
    assert r.model_extra is not None
    prompt_ids = r.model_extra["prompt_token_ids"]
    expected_prompt = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert prompt_ids == tok(expected_prompt, add_special_tokens=False)["input_ids"]
    choice = r.choices[0]
    assert choice.model_extra is not None
    token_ids = choice.model_extra["token_ids"]
    assert len(token_ids) == r.usage.completion_tokens  # type: ignore[union-attr]
    assert tok.decode(token_ids, skip_special_tokens=True) == choice.message.content
    assert choice.logprobs is not None and choice.logprobs.content is not None
    served = [e.logprob for e in choice.logprobs.content]
    assert served == pytest.approx(forward_logprobs(model, prompt_ids, token_ids), abs=1e-4)
    for entry, token_id in zip(choice.logprobs.content, token_ids, strict=True):
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and tops[0] >= entry.logprob - 1e-6
        assert entry.token == tok.decode([token_id])


def test_stop_strings_cut_the_text(server: tuple[str, Any]) -> None:
    url, _ = server
    c = client(url)
    kwargs: dict[str, Any] = {"model": "tiny", "messages": MESSAGES, "max_tokens": 24, "temperature": 1.0, "seed": 5}
    full = c.chat.completions.create(**kwargs).choices[0].message.content
    assert full is not None and len(full) >= 6
    stop = full[3:5]
    assert full.find(stop) > 0
    cut = c.chat.completions.create(**kwargs, stop=[stop]).choices[0]
    assert cut.message.content == full[: full.find(stop)] and cut.finish_reason == "stop"
    streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(**kwargs, stop=[stop], stream=True))
    assert streamed == cut.message.content


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"temperature": 5.0}, "temperature"),
    ],
)
def test_bad_requests_get_openai_400_bodies(server: tuple[str, Any], body: dict[str, Any], param: str) -> None:
    url, _ = server
    r = httpx.post(f"{url}/chat/completions", json={"model": "tiny", "messages": MESSAGES, **body}, timeout=30)
    assert r.status_code == 400
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    with pytest.raises(openai.BadRequestError):
        client(url).chat.completions.create(model="tiny", messages=MESSAGES, extra_body=body)  # type: ignore[arg-type]
    bad_json = httpx.post(f"{url}/chat/completions", content=b"{not json", timeout=30)
    assert bad_json.status_code == 400 and "JSON" in bad_json.json()["error"]["message"]


def test_concurrent_requests_are_batched_and_padding_changes_nothing(server: tuple[str, Any]) -> None:
    url, app = server
    before = dict(app.state.engine.stats)
    # Prompts of different lengths (left padding in the batch), seeded sampling (per-row generators).
    requests = [{"model": "tiny", "messages": [{"role": "user", "content": "q" * (1 + 7 * i)}], "max_tokens": 8,
                 "temperature": 1.0, "seed": i, "logprobs": True, "return_token_ids": True} for i in range(6)]  # fmt: skip

    batched = post_concurrently(url, requests)
    stats = httpx.get(f"{url.removesuffix('/v1')}/stats", timeout=30).json()
    assert stats["inference/sequences"] - before["inference/sequences"] == 6
    assert stats["inference/batches"] - before["inference/batches"] <= 3  # 6 requests, at most 3 generate batches
    for request, together in zip(requests, batched, strict=True):
        alone = httpx.post(f"{url}/chat/completions", json=request, timeout=60).json()
        assert together["choices"][0]["token_ids"] == alone["choices"][0]["token_ids"]
        lp_together = [e["logprob"] for e in together["choices"][0]["logprobs"]["content"]]
        lp_alone = [e["logprob"] for e in alone["choices"][0]["logprobs"]["content"]]
        assert lp_together == pytest.approx(lp_alone, abs=1e-4)


def test_tools_reach_the_template_and_hidden_system_prompt(model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir)
    tools = [{"type": "function", "function": {"name": "calculator", "description": "Evaluate arithmetic.",
                                               "parameters": {"type": "object", "properties": {}}}}]  # fmt: skip
    app = build_app(model_dir, served_name="tiny", system_prompt="SECRET RULES: answer in French.")
    with serve_asgi(app) as url:
        r = client(url).chat.completions.create(
            model="tiny", messages=MESSAGES, tools=tools, max_tokens=4, extra_body={"return_token_ids": True},  # type: ignore[arg-type]
        )
    assert r.model_extra is not None
    prompt = tok.decode(r.model_extra["prompt_token_ids"])
    assert "SECRET RULES: answer in French.\n\nBe brief." in prompt
    assert '"name": "calculator"' in prompt and "# Tools" in prompt
    assert "SECRET" not in (r.choices[0].message.content or "")


def test_api_key_is_required_when_configured(model_dir: Path) -> None:
    app = build_app(model_dir, served_name="tiny", api_key="sk-serve-test")
    with serve_asgi(app) as url:
        with pytest.raises(openai.AuthenticationError):
            client(url, "sk-wrong").chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)  # type: ignore[arg-type]
        assert httpx.get(f"{url}/models", timeout=30).status_code == 401
        assert httpx.get(f"{url.removesuffix('/v1')}/health", timeout=30).status_code == 200
        r = client(url, "sk-serve-test").chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)  # type: ignore[arg-type]
        assert r.choices[0].finish_reason in ("stop", "length")


def test_load_weights_swaps_the_model(model_dir: Path, tmp_path: Path) -> None:
    other = save_tiny_student(tmp_path / "other", seed=1)
    new_model = AutoModelForCausalLM.from_pretrained(other).eval()
    # The trainer's layout: OUTPUT/weights/step_{n}/ with a COMPLETE marker written last.
    step_dir = tmp_path / "weights" / "step_3"
    shutil.copytree(other, step_dir)
    truncated = tmp_path / "truncated"
    shutil.copytree(other, truncated)
    (truncated / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes()[:1000])
    app = build_app(model_dir, served_name="tiny", api_key="sk-load")
    auth = {"Authorization": "Bearer sk-load"}
    sampled: dict[str, Any] = {"model": "tiny", "messages": MESSAGES, "max_tokens": 12, "temperature": 1.0, "seed": 4}
    greedy: dict[str, Any] = {"model": "tiny", "messages": MESSAGES, "max_tokens": 6, "temperature": 0,
                              "logprobs": True, "return_token_ids": True}  # fmt: skip

    def answer(url: str) -> str:
        r = httpx.post(f"{url}/chat/completions", json=sampled, headers=auth, timeout=60)
        return str(r.json()["choices"][0]["message"]["content"])

    def load(url: str, path: Path, step: int) -> httpx.Response:
        return httpx.post(f"{url}/load_weights", json={"path": str(path), "step": step}, headers=auth, timeout=60)

    with serve_asgi(app) as url:
        assert httpx.get(f"{url}/weights", headers=auth, timeout=30).json() == {"step": 0, "path": str(model_dir)}
        first = answer(url)
        # The endpoints need the key like every other one.
        assert httpx.post(f"{url}/load_weights", json={"path": str(other), "step": 1}, timeout=30).status_code == 401
        assert httpx.get(f"{url}/weights", timeout=30).status_code == 401
        for bad, words in [(tmp_path / "nope", "does not exist"), (step_dir, "COMPLETE"),
                           (truncated, "could not be loaded"), (tmp_path, "config.json")]:  # fmt: skip
            refused = load(url, bad, 1)
            assert refused.status_code == 400 and refused.json()["error"]["param"] == "path", refused.text
            assert words in refused.json()["error"]["message"]
        assert answer(url) == first  # nothing changed by the refused loads

        # A generation in flight when the weights change finishes on the old weights.
        long = {**sampled, "max_tokens": 400}
        before = httpx.post(f"{url}/chat/completions", json=long, headers=auth, timeout=60).json()["choices"][0]
        with httpx.stream("POST", f"{url}/chat/completions", json={**long, "stream": True}, headers=auth,
                          timeout=60) as stream:  # fmt: skip
            lines = stream.iter_lines()
            head = [next(lines) for _ in range(3)]  # the role chunk and the first deltas: decoding has started
            loaded = load(url, other, 1)
            events = [json.loads(x[6:]) for x in [*head, *lines] if x.startswith("data: {")]
        assert loaded.status_code == 200 and loaded.json().pop("reload_s") > 0  # how long the server took
        assert loaded.json() == {"step": 1, "path": str(other), "reload_s": loaded.json()["reload_s"]}
        in_flight = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
        assert in_flight == before["message"]["content"]
        assert httpx.get(f"{url}/weights", headers=auth, timeout=30).json() == {"step": 1, "path": str(other)}
        second = answer(url)
        assert second != first  # same prompt, same seed, other weights
        body = httpx.post(f"{url}/chat/completions", json=greedy, headers=auth, timeout=60).json()

        assert {k: v for k, v in load(url, model_dir, 2).json().items() if k != "reload_s"} == {"step": 2, "path": str(model_dir)}
        assert answer(url) == first  # the first weights are back
        (step_dir / "COMPLETE").write_text("{}")
        assert load(url, step_dir, 3).status_code == 200
        assert answer(url) == second
        stats = httpx.get(f"{url.removesuffix('/v1')}/stats", headers=auth, timeout=30).json()
        assert stats["inference/weights_version"] == 3 and stats["inference/weights_step"] == 3
    choice = body["choices"][0]
    served = [e["logprob"] for e in choice["logprobs"]["content"]]
    assert served == pytest.approx(forward_logprobs(new_model, body["prompt_token_ids"], choice["token_ids"]), abs=1e-4)


def test_prompt_prefix_messages_are_prepended_and_hidden(model_dir: Path, tmp_path: Path) -> None:
    from apprentice.inference.server import read_prompt_prefix

    prefix_file = tmp_path / "prefix.json"
    prefix_file.write_text(json.dumps([
        {"role": "system", "content": "Answer with one word."},
        {"role": "user", "content": "Capital of Peru?"},
        {"role": "assistant", "content": "Lima"},
    ]))  # fmt: skip
    tok = AutoTokenizer.from_pretrained(model_dir)
    app = build_app(model_dir, served_name="tiny", prompt_prefix=read_prompt_prefix(prefix_file))
    with serve_asgi(app) as url:
        r = client(url).chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=2, extra_body={"return_token_ids": True},  # type: ignore[arg-type]
        )
    assert r.model_extra is not None
    prompt = tok.decode(r.model_extra["prompt_token_ids"])
    # The client's own system turn merges with the hidden one; the worked example follows, then the client's turns.
    assert prompt.index("Answer with one word.\n\nBe brief.") < prompt.index("Capital of Peru?") < prompt.index("Lima")
    assert prompt.rstrip().endswith("assistant")
    bad = tmp_path / "bad.json"
    bad.write_text('[{"role": "robot", "content": "x"}]')
    with pytest.raises(ValueError, match="entry 0"):
        read_prompt_prefix(bad)


def test_answers_to_one_prompt_prefill_it_once_and_match_answers_alone(server: tuple[str, Any]) -> None:
    """A GRPO group (one prompt, several answers, as concurrent requests and as n): the prompt is prefilled once
    per batch, and every answer's tokens and logprobs are those it gets alone."""
    url, app = server
    requests = [{"model": "tiny", "messages": MESSAGES, "max_tokens": 8, "temperature": 1.0, "seed": 10 * i, "n": 2,
                 "logprobs": True, "return_token_ids": True} for i in range(3)]  # fmt: skip
    before = dict(app.state.engine.stats)

    together = post_concurrently(url, requests)
    stats = dict(app.state.engine.stats)
    assert stats["inference/sequences"] - before["inference/sequences"] == 6
    assert stats["inference/prefilled_prompts"] - before["inference/prefilled_prompts"] == (
        stats["inference/batches"] - before["inference/batches"]
    )  # one prefill row per batch, however many answers it decodes
    for request, response in zip(requests, together, strict=True):
        for k, choice in enumerate(response["choices"]):
            alone = httpx.post(f"{url}/chat/completions", json={**request, "n": 1, "seed": request["seed"] + k},
                               timeout=60).json()["choices"][0]  # fmt: skip
            assert choice["token_ids"] == alone["token_ids"]
            lp_shared = [e["logprob"] for e in choice["logprobs"]["content"]]
            assert lp_shared == pytest.approx([e["logprob"] for e in alone["logprobs"]["content"]], abs=1e-5)


def test_rows_that_finish_early_leave_the_batch_and_the_others_decode_as_alone(server: tuple[str, Any]) -> None:
    """One batch whose rows stop at 2, 5 and 9 tokens (max_tokens): the rows still decoding after others finished
    give the tokens and logprobs they give alone."""
    url, app = server
    requests = [{"model": "tiny", "messages": [{"role": "user", "content": "z" * (3 + i)}], "max_tokens": m,
                 "temperature": 1.0, "seed": i, "logprobs": True, "return_token_ids": True}
                for i, m in enumerate((2, 5, 9, 9))]  # fmt: skip
    before = dict(app.state.engine.stats)

    together = post_concurrently(url, requests)
    assert app.state.engine.stats["inference/batches"] - before["inference/batches"] == 1
    for request, response in zip(requests, together, strict=True):
        choice = response["choices"][0]
        assert len(choice["token_ids"]) <= request["max_tokens"]
        alone = httpx.post(f"{url}/chat/completions", json=request, timeout=60).json()["choices"][0]
        assert choice["token_ids"] == alone["token_ids"]
        lp_together = [e["logprob"] for e in choice["logprobs"]["content"]]
        assert lp_together == pytest.approx([e["logprob"] for e in alone["logprobs"]["content"]], abs=1e-4)
    assert len(together[0]["choices"][0]["token_ids"]) < len(together[2]["choices"][0]["token_ids"])
