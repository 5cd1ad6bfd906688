"""The token client (rl mode) against `apprentice serve`: token ids and logprobs come back through ChatResponse."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fault_teacher import serve_asgi
from transformers import AutoTokenizer

from apprentice.clients.openai_client import OpenAIChatClient
from apprentice.config import EndpointConfig, SamplingConfig
from apprentice.inference.server import build_app
from apprentice.testing.tiny import save_tiny_student


def test_token_client_gets_ids_and_logprobs(tmp_path: Path) -> None:
    model_dir = save_tiny_student(tmp_path / "student")
    tok = AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "user", "content": "hello"}]
    with serve_asgi(build_app(model_dir, served_name="student")) as url:
        client = OpenAIChatClient(
            EndpointConfig(base_url=url, model="student"),
            SamplingConfig(max_tokens=6, seed=0),
            max_concurrency=4,
            use_token_client=True,
            cache_dir=None,
        )

        async def go() -> list:  # type: ignore[type-arg]
            try:
                return list(await asyncio.gather(*(client.chat(messages, key=f"s{i}") for i in range(3))))
            finally:
                await client.aclose()

        responses = asyncio.run(go())
    expected_prompt = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                          add_special_tokens=False)["input_ids"]  # fmt: skip
    for r in responses:
        assert r.prompt_ids == expected_prompt
        assert r.completion_ids is not None and r.completion_logprobs is not None
        assert 1 <= len(r.completion_ids) == len(r.completion_logprobs) <= 6
        assert all(lp <= 0.0 for lp in r.completion_logprobs)
        assert tok.decode(r.completion_ids, skip_special_tokens=True) == r.message["content"]
    assert client.metrics()["teacher/requests"] == 3
