"""`apprentice serve` answers both scoring protocols and vLLM's /tokenize, on loopback (tiny fp32 model): echo
logprobs equal a direct transformers forward pass within 1e-4, and equal the prompt_logprobs path's."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fault_teacher import serve_asgi
from transformers import AutoModelForCausalLM, AutoTokenizer

from apprentice.inference.server import build_app
from apprentice.testing.tiny import save_tiny_student

CONVERSATION = [{"role": "user", "content": "Reverse the text: naïve 🙂 café"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any, Any]]:
    model_dir: Path = save_tiny_student(tmp_path_factory.mktemp("tiny") / "teacher", seed=4)
    app = build_app(model_dir, served_name="tiny", dtype="float32", device="cpu")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with serve_asgi(app) as url:
        yield url, model, AutoTokenizer.from_pretrained(model_dir)


def direct_logprobs(model: Any, ids: list[int]) -> list[float]:
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return [float(logprobs[i - 1, ids[i]]) for i in range(1, len(ids))]


def test_echo_logprobs_equal_a_direct_forward_pass(served: tuple[str, Any, Any]) -> None:
    url, model, tok = served
    text = tok.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False) + "éo 🙂 olleh<|im_end|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    expected = direct_logprobs(model, ids)
    for max_tokens in (0, 1):
        body = {"model": "tiny", "prompt": ids, "echo": True, "logprobs": 2, "max_tokens": max_tokens, "temperature": 0}
        response = httpx.post(f"{url}/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        (choice,) = response.json()["choices"]
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == len(ids) + max_tokens
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        got = lp["token_logprobs"][1 : len(ids)]
        assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) < 1e-4
        assert choice["text"].startswith(text)
        # Offsets index the returned text; a piece of a character is written as its bytes.
        for piece, offset in zip(lp["tokens"], lp["text_offset"], strict=True):
            assert piece.startswith("bytes:") or choice["text"][offset:].startswith(piece)
        assert any(p.startswith("bytes:") for p in lp["tokens"])  # the tiny vocabulary splits 🙂 into bytes
        assert all(len(alts) >= 1 for alts in lp["top_logprobs"][1:])
    # The same numbers as the prompt_logprobs protocol.
    plp = httpx.post(f"{url}/completions", json={"model": "tiny", "prompt": ids, "max_tokens": 1, "prompt_logprobs": 0},
                     timeout=60).json()["choices"][0]["prompt_logprobs"]  # fmt: skip
    assert [e[str(t)]["logprob"] for e, t in zip(plp[1:], ids[1:], strict=True)] == pytest.approx(got, abs=1e-6)


def test_echo_requests_that_cannot_score_are_refused(served: tuple[str, Any, Any]) -> None:
    url, _, _ = served
    base = {"model": "tiny", "prompt": [1, 2, 3], "echo": True, "logprobs": 1, "max_tokens": 0}
    for bad, param in (({"logprobs": None}, "echo"), ({"max_tokens": 2}, "echo"), ({"prompt_logprobs": 0}, "echo"),
                       ({"echo": False, "max_tokens": 3}, "logprobs"), ({"logprobs": 21}, "logprobs")):  # fmt: skip
        response = httpx.post(f"{url}/completions", json={**base, **bad}, timeout=60)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, (bad, response.text)


def test_tokenize_chat_and_text_like_vllm(served: tuple[str, Any, Any]) -> None:
    url, _, tok = served
    root = url.removesuffix("/v1")
    chat = httpx.post(f"{root}/tokenize", json={"model": "tiny", "messages": CONVERSATION, "add_generation_prompt": True},
                      timeout=60).json()  # fmt: skip
    rendered = tok.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    expected = tok(rendered, add_special_tokens=False)["input_ids"]
    assert chat["tokens"] == expected and chat["count"] == len(expected) and chat["max_model_len"] > 0
    no_gen = httpx.post(
        f"{url}/tokenize", json={"messages": CONVERSATION, "add_generation_prompt": False}, timeout=60
    ).json()
    assert expected[: len(no_gen["tokens"])] == no_gen["tokens"] and len(no_gen["tokens"]) < len(expected)

    text = "naïve 🙂 café\n\tx"
    plain = httpx.post(f"{url}/tokenize", json={"prompt": text, "return_token_strs": True}, timeout=60).json()
    assert plain["tokens"] == tok(text)["input_ids"]
    assert "".join(s for s in plain["token_strs"] if not s.startswith("bytes:")) != text  # 🙂 came as bytes
    assert any(s.startswith("bytes:") for s in plain["token_strs"])
    for bad in (
        {},
        {"prompt": "a", "messages": CONVERSATION},
        {"messages": CONVERSATION, "continue_final_message": True},
    ):
        assert httpx.post(f"{url}/tokenize", json=bad, timeout=60).status_code == 400, bad


def test_the_echo_client_scores_identical_prompts_in_flight_once(served: tuple[str, Any, Any], tmp_path: Path) -> None:
    import asyncio

    from apprentice.clients.echo import EchoScoringClient
    from apprentice.config import EndpointConfig

    url, model, tokenizer = served
    text = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    client = EchoScoringClient(EndpointConfig(base_url=url, model="tiny"), max_concurrency=4, cache_dir=tmp_path)

    async def three() -> list[Any]:
        try:
            return await asyncio.gather(*(client.score(ids) for _ in range(3)))
        finally:
            await client.aclose()

    scores = asyncio.run(three())
    m = client.metrics()
    assert m["distill/requests"] == 1 and m["distill/shared_requests"] == 2
    assert scores[0].logprobs == scores[1].logprobs == scores[2].logprobs
    expected = direct_logprobs(model, ids)
    assert all(abs(a - b) < 1e-4 for a, b in zip(scores[0].logprobs[1:], expected, strict=True))
