"""The teacher-scoring client of on-policy distillation: one logprob per student token, from a teacher endpoint.

One request per student sample, on the completions API with a token-id prompt and vLLM's `prompt_logprobs`
extension (vLLM and `apprentice serve` both answer it):

    POST {base_url}/completions
    {"model": M, "prompt": [ids of the whole sample], "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0}
    -> {"choices": [{"prompt_logprobs": [null, {"<id_1>": {"logprob": -1.2, "rank": 3, ...}}, ...], ...}], ...}

Entry i is the teacher's logprob of token i after tokens 0..i-1 (entry 0 is null: nothing precedes it). Scoring
the whole sample at once gives every assistant token of a multi-turn sample its logprob after exactly the
prefix the student saw, environment tokens included. `prompt_logprobs: 0` asks for the prompt token alone
(no alternatives), the smallest answer; the token's own entry is looked up by its id, as vLLM may add others.

The client policy is distill mode's (`OpenAIChatClient`: bounded concurrency, rate limit, retries with
backoff and jitter, errors counted by kind): this class only changes what is sent and how the answer is read,
and keeps the cache under OUTPUT/teacher_cache (same module, same layout): a resumed run finds every score it
already paid for. Metrics are under `distill/` (distill/requests, distill/cache_hits, distill/errors/<kind>, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from apprentice.clients.base import ChatResponse, ClientError
from apprentice.clients.cache import ResponseCache
from apprentice.clients.http import RawResponse
from apprentice.clients.openai_client import OpenAIChatClient
from apprentice.config import EndpointConfig, SamplingConfig


@dataclass
class PromptScores:
    """The teacher's answer to one scoring request."""

    logprobs: list[float | None]
    """[T] logprob of token i after tokens 0..i-1; None where the server gives none (position 0, hidden heads)."""
    token_ids: list[int] | None = None
    """[T] the prompt as the server tokenized it, when it says (`return_token_ids`; text prompts)."""


def parse_prompt_logprobs(data: Any, prompt_ids: list[int] | None) -> PromptScores:
    """First choice's `prompt_logprobs` (+ `prompt_token_ids` when present); ValueError if malformed.

    With `prompt_ids` (a token-id prompt), each entry is looked up by the id sent at that position and the
    length must match; without (a text prompt), the ids come from `prompt_token_ids` or the entries themselves.
    """
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list) or not data["choices"]:
        raise ValueError("no 'choices' array")
    choice = data["choices"][0]
    entries = choice.get("prompt_logprobs") if isinstance(choice, dict) else None
    if not isinstance(entries, list):
        raise ValueError("choices[0] has no 'prompt_logprobs' list: the server does not score prompts "
                         "(vLLM and `apprentice serve` do)")  # fmt: skip
    echoed = choice.get("prompt_token_ids", data.get("prompt_token_ids"))
    token_ids = [int(t) for t in echoed] if isinstance(echoed, list) else None
    ids = prompt_ids if prompt_ids is not None else token_ids
    if ids is not None and len(entries) != len(ids):
        raise ValueError(f"{len(entries)} prompt_logprobs entries for a prompt of {len(ids)} tokens")
    logprobs: list[float | None] = []
    recovered: list[int] = []
    for i, entry in enumerate(entries):
        if entry is None:
            logprobs.append(None)
            recovered.append(-1)
            continue
        if not isinstance(entry, dict) or not entry:
            raise ValueError(f"prompt_logprobs[{i}] is not an object of token id -> logprob")
        key = str(ids[i]) if ids is not None else next(iter(entry))
        if key not in entry:
            raise ValueError(f"prompt_logprobs[{i}] has no entry for the prompt's token id {key}")
        value = entry[key]
        logprob = value.get("logprob") if isinstance(value, dict) else value
        if not isinstance(logprob, int | float) or isinstance(logprob, bool) or math.isnan(logprob) or logprob > 1e-6:
            raise ValueError(f"prompt_logprobs[{i}] holds {logprob!r}, not a logprob")
        logprobs.append(float(logprob))
        recovered.append(int(key))
    if token_ids is None and prompt_ids is None:
        token_ids = recovered  # -1 where the server gave no entry (position 0)
    return PromptScores(logprobs=logprobs, token_ids=token_ids)


def stored_scores_problem(response: Any) -> str | None:
    """What is wrong with a cached score ({"logprobs": [float | None], "token_ids": [int] | None}), or None."""
    if not isinstance(response, dict):
        return f"has a response of type {type(response).__name__}, not an object"
    logprobs = response.get("logprobs")
    if not isinstance(logprobs, list) or not all(v is None or (isinstance(v, int | float) and not isinstance(v, bool))
                                                 for v in logprobs):  # fmt: skip
        return "has no list of logprobs (numbers or null) in its response"
    token_ids = response.get("token_ids")
    if token_ids is not None and not (isinstance(token_ids, list) and all(isinstance(t, int) for t in token_ids)):
        return "has token_ids that are not a list of integers"
    return None


class TeacherScoringClient(OpenAIChatClient):
    """Scores token sequences on a teacher's completions API; the retry policy and cache are the chat client's."""

    def __init__(
        self,
        endpoint: EndpointConfig,
        *,
        max_concurrency: int,
        cache_dir: Path | None,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        jitter_seed: int | None = None,
    ) -> None:
        super().__init__(
            endpoint, SamplingConfig(), max_concurrency=max_concurrency, use_token_client=False, cache_dir=cache_dir,
            backoff_base_s=backoff_base_s, backoff_max_s=backoff_max_s, jitter_seed=jitter_seed,
        )  # fmt: skip
        # Same cache module and layout as the chat client's, checking the shape this client stores.
        self._cache = ResponseCache(cache_dir, check=stored_scores_problem) if cache_dir is not None else None
        self._url = f"{endpoint.base_url}/completions"

    def build_score_request(self, prompt: list[int] | str, *, return_token_ids: bool = False) -> dict[str, Any]:
        """The exact JSON body of one scoring request (also the cache key's request part)."""
        body: dict[str, Any] = {"model": self.endpoint.model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0,
                                "prompt_logprobs": 0}  # fmt: skip
        if return_token_ids:
            body["return_token_ids"] = True
        return body

    async def score(self, prompt: list[int] | str, *, return_token_ids: bool = False) -> PromptScores:
        """The teacher's logprob of every prompt token after its prefix. Raises `ClientError` when it fails for good.

        Token-id prompts are cached (the answer is a pure function of the ids and the teacher); a resumed run
        that scores the same sample again reads it from disk (`distill/cache_hits`) without a request.
        """
        body = self.build_score_request(prompt, return_token_ids=return_token_ids)
        use_cache = self._cache is not None and isinstance(prompt, list)
        if use_cache:
            assert self._cache is not None
            stored = self._cache.get(body, "")
            if stored is not None:
                self._counters["teacher/cache_hits"] += 1
                return PromptScores(logprobs=stored["logprobs"], token_ids=stored.get("token_ids"))
        try:
            data = cast(dict[str, Any], await self._request_with_retries(body))
            usage: dict[str, Any] = data["usage"] if isinstance(data.get("usage"), dict) else {}
            try:
                result = parse_prompt_logprobs(data, prompt if isinstance(prompt, list) else None)
            except ValueError as e:
                self._counters["teacher/malformed"] += 1
                # A server that does not score prompts (or scores other tokens) does so on every request: no retry.
                raise ClientError("malformed", f"{self.endpoint.base_url}/completions: {e}") from e
        except ClientError as e:
            self._counters[f"teacher/errors/{e.kind}"] += 1
            raise
        self._counters["teacher/prompt_tokens"] += float(usage.get("prompt_tokens") or 0)
        self._counters["teacher/responses"] += 1
        if use_cache:
            assert self._cache is not None
            self._cache.put(body, "", {"logprobs": result.logprobs, "token_ids": result.token_ids})
        return result

    async def score_sample(self, token_ids: list[int], loss_mask: list[bool]) -> list[float]:
        """[T] teacher logprobs of a sample's tokens; 0.0 off the loss mask. A loss token without a teacher
        logprob is a `ClientError("malformed")`: a silent 0.0 there would be trained as if it were a score."""
        scores = await self.score(token_ids)
        out: list[float] = []
        for i, (lp, m) in enumerate(zip(scores.logprobs, loss_mask, strict=True)):
            if m and lp is None:
                self._counters["teacher/errors/malformed"] += 1
                raise ClientError("malformed", f"the teacher returned no logprob for trained token {i} of {len(token_ids)}")
            out.append(lp if m and lp is not None else 0.0)
        return out

    def metrics(self, reset: bool = False) -> dict[str, float]:
        """Counters under `distill/` (requests, retries, cache_hits, responses, errors/<kind>, latency_s, ...)."""
        out = super().metrics(reset)
        return {k.replace("teacher/", "distill/", 1): v for k, v in out.items()
                if k not in ("teacher/truncated", "teacher/empty")}  # fmt: skip

    # ---- the completions API, under the chat client's retry policy ----

    def _parse(self, data: dict[str, Any]) -> ChatResponse:
        """Pass the JSON body through (read in `score`, which knows the prompt)."""
        if not isinstance(data, dict):
            self._counters["teacher/malformed"] += 1
            raise ClientError("malformed", f"{self.endpoint.base_url}/completions answered JSON that is not an object")
        return cast(ChatResponse, data)

    def _check_server(self, raw: RawResponse, data: Any, body: dict[str, Any]) -> None:
        """Scoring sends no sampling options (the teacher's distribution is read, not sampled): nothing to warn of."""
