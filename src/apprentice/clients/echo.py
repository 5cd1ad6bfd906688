"""Teacher scoring over the legacy completions API: `echo: true` with `logprobs` (OpenAI's original scoring trick,
served by vLLM, several hosted providers and `apprentice serve`).

    POST {base_url}/completions
    {"model": M, "prompt": [ids], "echo": true, "logprobs": 0, "max_tokens": 1, "temperature": 0}
    -> choices[0].logprobs = {"tokens": [...], "token_logprobs": [null, lp_1, ...], "text_offset": [...], ...}

Entry i of token_logprobs is the teacher's logprob of prompt token i after tokens 0..i-1 (the first is null);
entries past the prompt are the generated token's (max_tokens 1: some providers refuse 0) and are dropped.
The answer is read into the same `PromptScores` as vLLM's `prompt_logprobs` protocol (clients/scoring.py), so
the rest of on-policy distillation does not care which protocol the teacher speaks.

Requests go through the scoring client's transport (bounded concurrency, rate limit, retries with backoff and
jitter, errors counted by kind under `distill/`); this module only builds the body, reads the answer and
caches it under OUTPUT/teacher_cache (keyed by this body, so the two protocols never share an entry).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any, cast

from apprentice.clients.base import ClientError
from apprentice.clients.cache import ResponseCache
from apprentice.clients.scoring import PromptScores, TeacherScoringClient, stored_scores_problem


def parse_echo_logprobs(data: Any, n_prompt: int) -> PromptScores:
    """[n_prompt] logprobs from choices[0].logprobs.token_logprobs (None for the first); ValueError if malformed."""
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list) or not data["choices"]:
        raise ValueError("no 'choices' array")
    choice = data["choices"][0]
    logprobs = choice.get("logprobs") if isinstance(choice, dict) else None
    values = logprobs.get("token_logprobs") if isinstance(logprobs, dict) else None
    if not isinstance(values, list):
        raise ValueError("choices[0].logprobs has no 'token_logprobs' list: the server does not echo scored "
                         "prompts (OpenAI's legacy completions shape; vLLM and `apprentice serve` do)")  # fmt: skip
    if len(values) < n_prompt:
        raise ValueError(f"{len(values)} echoed token logprobs for a prompt of {n_prompt} tokens")
    out: list[float | None] = []
    for i, value in enumerate(values[:n_prompt]):
        if value is None:
            out.append(None)
            continue
        if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value) or value > 1e-6:
            raise ValueError(f"token_logprobs[{i}] holds {value!r}, not a logprob")
        out.append(float(value))
    return PromptScores(logprobs=out)


class EchoScoringClient:
    """Scores token-id prompts with `echo` + `logprobs`; same `score(ids)` as TeacherScoringClient."""

    def __init__(self, transport: TeacherScoringClient, cache_dir: Path | None) -> None:
        self.transport = transport
        self.endpoint = transport.endpoint
        self._cache = ResponseCache(cache_dir, check=stored_scores_problem) if cache_dir is not None else None
        self._counters: Counter[str] = Counter()  # float counts (token sums)

    def build_score_request(self, prompt: list[int]) -> dict[str, Any]:
        """The exact JSON body of one scoring request (also the cache key's request part)."""
        return {"model": self.endpoint.model, "prompt": prompt, "echo": True, "logprobs": 0, "max_tokens": 1,
                "temperature": 0.0}  # fmt: skip

    async def score(self, prompt: list[int]) -> PromptScores:
        """The teacher's logprob of every prompt token after its prefix. Raises `ClientError` when it fails for good."""
        body = self.build_score_request(prompt)
        cache = self._cache
        if cache is not None:
            stored = cache.get(body, "")
            if stored is not None:
                self._counters["distill/cache_hits"] += 1
                return PromptScores(logprobs=stored["logprobs"])
        try:
            # The transport posts to {base_url}/completions and hands the JSON body back unread.
            data = cast(dict[str, Any], await self.transport._request_with_retries(body))
            try:
                result = parse_echo_logprobs(data, len(prompt))
            except ValueError as e:
                raise ClientError("malformed", f"{self.endpoint.base_url}/completions (echo): {e}") from e
        except ClientError as e:
            self._counters[f"distill/errors/{e.kind}"] += 1
            raise
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        self._counters["distill/prompt_tokens"] += int((usage or {}).get("prompt_tokens") or 0)
        self._counters["distill/responses"] += 1
        if cache is not None:
            cache.put(body, "", {"logprobs": result.logprobs, "token_ids": None})
        return result

    def metrics(self, reset: bool = False) -> dict[str, float]:
        """The transport's request counters (requests, retries, latency) plus this protocol's, under `distill/`."""
        out = self.transport.metrics(reset)
        for name, value in self._counters.items():
            out[name] = out.get(name, 0.0) + value
        if reset:
            self._counters.clear()
        return out

    async def aclose(self) -> None:
        await self.transport.aclose()
