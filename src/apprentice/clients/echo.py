"""Teacher scoring over the legacy completions API: `echo: true` with `logprobs` (OpenAI's original scoring trick,
served by vLLM, several hosted providers and `apprentice serve`).

    POST {base_url}/completions
    {"model": M, "prompt": [ids], "echo": true, "logprobs": 0, "max_tokens": 1, "temperature": 0}
    -> choices[0].logprobs = {"tokens": [...], "token_logprobs": [null, lp_1, ...], "text_offset": [...], ...}

Entry i of token_logprobs is the teacher's logprob of prompt token i after tokens 0..i-1 (the first is null);
entries past the prompt are the generated token's (max_tokens 1: some providers refuse 0) and are dropped.
The answer is read into the same `PromptScores` as vLLM's `prompt_logprobs` protocol (clients/scoring.py), so
the rest of on-policy distillation does not care which protocol the teacher speaks.

Requests go through the shared `EndpointSession` (bounded concurrency, rate limit, retries with backoff and
jitter, errors counted by kind, under `distill/`), logprobs are checked on entry like the other protocol's
(clients/logprobs.py: a non-finite or absurd value sets the sample aside and is never cached), and answers are
cached under OUTPUT/teacher_cache keyed by this body (the two protocols never share an entry).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from apprentice.clients.base import Budget, ClientError
from apprentice.clients.cache import ResponseCache, SharedRequests, cache_digest
from apprentice.clients.http import RawResponse
from apprentice.clients.logprobs import BadLogprob, check_logprob
from apprentice.clients.scoring import PromptScores, stored_scores_problem
from apprentice.clients.session import EndpointSession
from apprentice.config import EndpointConfig

_BASE_RESPONSE_BYTES = 4 * 1024 * 1024
_BYTES_PER_TOKEN = 256  # a token's piece, logprob, offset and its one-entry top_logprobs object


def parse_echo_logprobs(data: Any, n_prompt: int) -> PromptScores:
    """[n_prompt] logprobs from choices[0].logprobs.token_logprobs (None for the first); ValueError if malformed,
    BadLogprob for a value that must not be trained on."""
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list) or not data["choices"]:
        raise ValueError("no 'choices' array")
    choice = data["choices"][0]
    logprobs = choice.get("logprobs") if isinstance(choice, dict) else None
    values = logprobs.get("token_logprobs") if isinstance(logprobs, dict) else None
    if not isinstance(values, list):
        raise ValueError("choices[0].logprobs has no 'token_logprobs' list: the server does not echo scored "
                         "prompts (OpenAI's legacy completions shape; vLLM and `apprentice serve` do)")  # fmt: skip
    if not n_prompt <= len(values) <= n_prompt + 1:  # the prompt's, plus the one generated token (max_tokens = 1)
        raise ValueError(f"{len(values)} echoed token logprobs for a prompt of {n_prompt} tokens (and at most one "
                         "generated): the server scored another token sequence (a BOS token added to the prompt?)")  # fmt: skip
    out: list[float | None] = [None if v is None else check_logprob(v, f"token_logprobs[{i}]")
                               for i, v in enumerate(values[:n_prompt])]  # fmt: skip
    return PromptScores(logprobs=out)


class EchoScoringClient:
    """Scores token-id prompts with `echo` + `logprobs`; the same `score(ids)` as TeacherScoringClient."""

    def __init__(self, endpoint: EndpointConfig, *, max_concurrency: int, cache_dir: Path | None,
                 backoff_base_s: float = 0.5, jitter_seed: int | None = None, budget: Budget | None = None) -> None:  # fmt: skip
        self.endpoint = endpoint
        self._session = EndpointSession(
            endpoint, f"{endpoint.base_url}/completions", max_concurrency=max_concurrency,
            max_response_bytes=endpoint.max_response_bytes or _BASE_RESPONSE_BYTES, backoff_base_s=backoff_base_s,
            jitter_seed=jitter_seed, section="orchestrator.teacher_model", budget=budget,
        )  # fmt: skip
        self._counters = self._session.counters
        self._cache = ResponseCache(cache_dir, check=stored_scores_problem) if cache_dir is not None else None
        self._shared = SharedRequests(on_shared=lambda: self._session.count("shared_requests"))

    def build_score_request(self, prompt: list[int]) -> dict[str, Any]:
        """The exact JSON body of one scoring request (also the cache key's request part)."""
        return {"model": self.endpoint.model, "prompt": prompt, "echo": True, "logprobs": 0, "max_tokens": 1,
                "temperature": 0.0}  # fmt: skip

    async def score(self, prompt: list[int]) -> PromptScores:
        """The teacher's logprob of every prompt token after its prefix. Raises `ClientError` when it fails for good."""
        body = self.build_score_request(prompt)
        if self._cache is not None:
            stored = self._cache.get(body, "")
            if stored is not None:
                self._counters["teacher/cache_hits"] += 1
                return PromptScores(logprobs=stored["logprobs"])

        def read(raw: RawResponse, data: Any) -> tuple[PromptScores, dict[str, Any]]:
            usage: dict[str, Any] = data["usage"] if isinstance(data, dict) and isinstance(data.get("usage"), dict) else {}
            try:
                return parse_echo_logprobs(data, len(prompt)), usage
            except BadLogprob as e:  # a broken teacher: set this sample aside, cache nothing, no retry
                raise ClientError(e.kind, f"{self.endpoint.base_url}/completions (echo): {e}") from None
            except ValueError as e:  # a server that does not echo scores does so every time: no retry
                self._counters["teacher/malformed"] += 1
                raise ClientError("malformed", f"{self.endpoint.base_url}/completions (echo): {e}") from None

        max_bytes = self.endpoint.max_response_bytes or _BASE_RESPONSE_BYTES + _BYTES_PER_TOKEN * len(prompt)

        async def request() -> PromptScores:
            result = await self._session.scoring_request(body, read, max_bytes=max_bytes)
            if self._cache is not None:
                self._cache.put(body, "", {"logprobs": result.logprobs, "token_ids": None})
            return result

        if self._cache is None:  # the probe's client: asks the teacher every time
            return await request()
        return await self._shared.run(cache_digest(body, ""), request)  # identical samples pay once

    def metrics(self, reset: bool = False) -> dict[str, float]:
        """Counters under `distill/` (requests, retries, cache_hits, responses, errors/<kind>, latency_s, ...)."""
        return {k.replace("teacher/", "distill/", 1): v for k, v in self._session.metrics(reset).items()}

    async def aclose(self) -> None:
        await self._session.aclose()
