"""A teacher with another tokenizer behind a real `apprentice serve` app on loopback: the /tokenize requests of
the teacher side are counted per step (`distill/tokenize/*`, beside the scoring requests' `distill/*`), the
chosen spread rule reaches the scorer and keeps every sample's sum, and `use_endpoint_tokenize = false` builds
the teacher side from the local tokenizer with the same values and no /tokenize request."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fault_teacher import serve_asgi

from apprentice.config import TeacherEndpointConfig
from apprentice.config.orchestrator import OnPolicyDistillConfig
from apprentice.crosstok.align import SPREADS
from apprentice.inference.server import build_app
from apprentice.orchestrator import on_policy
from apprentice.orchestrator.on_policy import OnPolicyDistiller
from apprentice.render.tokens import render_tokens
from apprentice.testing.tiny import build_tiny_tokenizer
from apprentice.testing.tiny_sp import save_tiny_sp_model

ANSWERS = ["the quick brown fox", "hello world"]  # one prompt for both: its /tokenize request is shared


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    teacher_dir = save_tiny_sp_model(tmp_path_factory.mktemp("sp") / "teacher", seed=3)
    app = build_app(teacher_dir, served_name="sp", dtype="float32", device="cpu")
    with serve_asgi(app) as url:
        yield url, teacher_dir


def trajectories(tok: Any) -> list[dict[str, Any]]:
    rng = random.Random(0)
    prompt = [{"role": "user", "content": "Say something."}]
    prompt_ids = tok(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False),
                     add_special_tokens=False)["input_ids"]  # fmt: skip
    out = []
    for answer in ANSWERS:
        # Character by character: the student's tokens are finer than the teacher's, so chunks of several
        # student tokens occur (where the spread rules differ).
        ids = [t for c in answer for t in tok(c, add_special_tokens=False)["input_ids"]] + [tok.convert_tokens_to_ids("<|im_end|>")]
        logprobs = [-rng.uniform(0.05, 4.0) for _ in ids]
        step = {"prompt": prompt, "completion": [{"role": "assistant", "content": answer}],
                "tokens": {"prompt_ids": prompt_ids, "completion_ids": ids, "completion_logprobs": logprobs}}  # fmt: skip
        out.append({"steps": [step], "advantage": 0.0})
    return out


async def two_steps(cfg: TeacherEndpointConfig, tok: Any, trajs: list[dict[str, Any]]) -> tuple[Any, list[Any], list[dict[str, float]]]:
    """Probe, then apply the same batch twice (two steps): (distiller, first step's samples, each step's metrics)."""
    distiller = OnPolicyDistiller(cfg, OnPolicyDistillConfig(), max_concurrency=2, cache_dir=None)
    try:
        await distiller.probe(tok)
        samples = [s for t in trajs for s in render_tokens(t["steps"])]
        kept, first = await distiller.apply(samples, trajs)
        _, second = await distiller.apply(samples, trajs)
        return distiller, kept, [first, second]
    finally:
        await distiller.aclose()


def values(kept: list[Any]) -> list[list[float]]:
    return [[a for a, m in zip(s.token_advantages, s.loss_mask, strict=True) if m] for s in kept]


def test_tokenize_requests_are_counted_per_step(served: tuple[str, Path]) -> None:
    url, _ = served
    tok = build_tiny_tokenizer()
    cfg = TeacherEndpointConfig(base_url=url, model="sp", max_retries=0, timeout_s=60)
    distiller, kept, (first, second) = asyncio.run(two_steps(cfg, tok, trajectories(tok)))
    assert type(distiller.cross.side).__name__ == "EndpointTeacherSide" and len(kept) == len(ANSWERS)
    # Step 1: the shared prompt once, then each answer's completion tokens (the startup probe's own /tokenize
    # requests are not counted in step 1). Step 2: the prompt is remembered, the completions asked again.
    assert first["distill/tokenize/requests"] == 1 + len(ANSWERS)
    assert second["distill/tokenize/requests"] == len(ANSWERS)
    for m in (first, second):
        assert m["distill/tokenize/retries"] == 0.0 and m["distill/tokenize/latency_s"] > 0.0
        assert m["distill/requests"] == len(ANSWERS)  # the scoring requests, one per turn, counted apart
        assert 0.0 < m["distill/multi_token_chunks"] <= 1.0


def test_spread_rule_from_config_and_the_local_teacher_side(served: tuple[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    url, teacher_dir = served
    tok = build_tiny_tokenizer()
    trajs = trajectories(tok)
    per_rule: dict[str, list[list[float]]] = {}
    for spread in SPREADS:
        cfg = TeacherEndpointConfig(base_url=url, model="sp", max_retries=0, timeout_s=60, spread=spread)
        distiller, kept, _ = asyncio.run(two_steps(cfg, tok, trajs))
        assert distiller.cross.spread == spread
        per_rule[spread] = values(kept)
    sums = [[sum(v) for v in rule] for rule in per_rule.values()]
    for rule_sums in sums[1:]:  # every rule: the same per-sample sum (teacher minus student logprob of the text)
        assert rule_sums == pytest.approx(sums[0], abs=1e-4)
    flat = {rule: [v for sample in per_sample for v in sample] for rule, per_sample in per_rule.items()}
    assert flat["even"] != pytest.approx(flat["last"], abs=1e-3)  # multi-token chunks: the rules differ
    local = TeacherEndpointConfig(base_url=url, model="sp", max_retries=0, timeout_s=60, spread="last",
                                  tokenizer=str(teacher_dir), use_endpoint_tokenize=False)  # fmt: skip
    built: list[str] = []  # tokenizing clients: none is built (one that were would be left unclosed)
    for name in ("VllmTokenizer", "LlamaCppTokenizer"):
        cls = getattr(on_policy, name)
        monkeypatch.setattr(on_policy, name, lambda *a, _cls=cls, _name=name, **k: built.append(_name) or _cls(*a, **k))
    distiller, kept, (first, _) = asyncio.run(two_steps(local, tok, trajs))
    assert built == []
    assert type(distiller.cross.side).__name__ == "TeacherSide" and distiller.remote is None
    assert not any(k.startswith("distill/tokenize/") for k in first)
    for got, want in zip(values(kept), per_rule["last"], strict=True):
        assert got == pytest.approx(want, abs=1e-4)
