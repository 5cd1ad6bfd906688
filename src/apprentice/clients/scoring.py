"""The teacher-scoring client of on-policy distillation: per student token, the teacher's logprob (and top-k).

One request per student sample, on the completions API with a token-id prompt and vLLM's `prompt_logprobs`
extension (vLLM and `apprentice serve` both answer it):

    POST {base_url}/completions
    {"model": M, "prompt": [ids of the whole sample], "max_tokens": 1, "temperature": 0, "prompt_logprobs": k}
    -> {"choices": [{"prompt_logprobs": [null, {"<id_1>": {"logprob": -1.2, "rank": 3, "decoded_token": ..}, ...},
                                         ...], ...}], ...}

Entry i is the teacher's distribution of token i after tokens 0..i-1 (entry 0 is null: nothing precedes it).
vLLM puts in each entry the k most likely tokens (ranks 1..k) plus the prompt's own token, which adds a
(k+1)-th key when it is outside the top-k; `k = 0` asks for the prompt token alone, the smallest answer
(`orchestrator.on_policy_distill.top_k = 0`, the sampled-token estimator). The token's own entry is looked up
by its id; the top-k are the entries of rank 1..k (by logprob when a server gives no ranks). Scoring the whole
sample at once gives every assistant token of a multi-turn sample its scores after exactly the prefix the
student saw, environment tokens included.

Every logprob is checked before anything is cached or returned (clients/logprobs.py: finite, within
[-1000, 0]); a bad one is a `ClientError` of kind `nonfinite_logprob` / `absurd_logprob`, which sets the sample
aside (`distill/set_aside/<kind>`) and is never cached, so a rerun against a working teacher asks again.

The request machinery (bounded concurrency, rate limit, retries with backoff and jitter, errors counted by
kind) is distill mode's `EndpointSession` (clients/session.py), composed here; answers are cached under
OUTPUT/teacher_cache (clients/cache.py, its shape checked by `stored_scores_problem`): a resumed run finds every
score it already paid for. Metrics are under `distill/` (distill/requests, distill/cache_hits,
distill/errors/<kind>, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apprentice.clients.base import Budget, ClientError
from apprentice.clients.cache import ResponseCache, SharedRequests, cache_digest
from apprentice.clients.http import RawResponse
from apprentice.clients.logprobs import BadLogprob, check_logprob, usable_logprob
from apprentice.clients.session import EndpointSession
from apprentice.config import EndpointConfig

_BASE_RESPONSE_BYTES = 4 * 1024 * 1024
_BYTES_PER_ENTRY = 128
"""One `"<id>": {"logprob": ..., "rank": ..., "decoded_token": ...}` in JSON, generously."""


@dataclass
class PromptScores:
    """The teacher's answer to one scoring request."""

    logprobs: list[float | None]
    """[T] logprob of token i after tokens 0..i-1; None where the server gives none (position 0, hidden heads)."""
    token_ids: list[int] | None = None
    """[T] the prompt as the server tokenized it, when it says (`return_token_ids`; text prompts)."""
    topk_ids: list[list[int]] | None = None
    """[T][<=k] with top_k > 0: the teacher's k most likely ids at position i, most likely first ([] where none)."""
    topk_logprobs: list[list[float]] | None = None
    """[T][<=k] their logprobs."""


@dataclass
class SampleScores:
    """A student sample's teacher scores, aligned with its tokens (0.0 / -1 off the loss mask)."""

    logprobs: list[float]
    """[T] the teacher's logprob of each sampled token; 0.0 off the loss mask."""
    topk_ids: list[list[int]] | None = None
    """[T][k] with top_k > 0 (TrainingSample.teacher_topk_ids): -1 rows off the loss mask, -1 padding."""
    topk_logprobs: list[list[float]] | None = None
    """[T][k] their logprobs; 0.0 at -1 entries."""


def _entry_logprob(value: Any, where: str) -> float:
    return check_logprob(value.get("logprob") if isinstance(value, dict) else value, where)


def _top(entry: dict[str, Any], k: int, where: str) -> tuple[list[int], list[float]]:
    """The k most likely (ids, logprobs) of one entry, most likely first: the entries of rank 1..k where the server
    gives ranks (vLLM's extra key for a prompt token outside the top-k has a rank above k), else by logprob."""
    rows: list[tuple[int, float, int | None]] = []  # (id, logprob, rank)
    for key, value in entry.items():
        rank = value.get("rank") if isinstance(value, dict) else None
        rows.append((int(key), _entry_logprob(value, f"{where}[{key!r}]"),
                     rank if isinstance(rank, int) and not isinstance(rank, bool) else None))  # fmt: skip
    if all(rank is not None for _, _, rank in rows):
        rows = sorted((r for r in rows if r[2] is not None and r[2] <= k), key=lambda r: (r[2], -r[1]))
    else:
        rows = sorted(rows, key=lambda r: -r[1])
    return [r[0] for r in rows[:k]], [r[1] for r in rows[:k]]


def parse_prompt_logprobs(data: Any, prompt_ids: list[int] | None, top_k: int = 0) -> PromptScores:
    """First choice's `prompt_logprobs` (+ `prompt_token_ids` when present); ValueError if malformed, `BadLogprob`
    (a ValueError) for a logprob that is not finite or outside [-1000, 0].

    With `prompt_ids` (a token-id prompt), each entry is looked up by the id sent at that position and the
    length must match; without (a text prompt), the ids come from `prompt_token_ids` or the entries themselves.
    With `top_k`, the k most likely entries of each position are kept too.
    """
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list) or not data["choices"]:
        raise ValueError("no 'choices' array")
    choice = data["choices"][0]
    entries = choice.get("prompt_logprobs") if isinstance(choice, dict) else None
    if not isinstance(entries, list):
        raise ValueError("choices[0] has no 'prompt_logprobs' list: the server does not score prompts "
                         "(vLLM and `apprentice serve` do)")  # fmt: skip
    echoed = choice.get("prompt_token_ids", data.get("prompt_token_ids"))
    if isinstance(echoed, list) and not all(isinstance(t, int) and not isinstance(t, bool) for t in echoed):
        raise ValueError("prompt_token_ids holds something other than token ids")
    token_ids = list(echoed) if isinstance(echoed, list) else None
    ids = prompt_ids if prompt_ids is not None else token_ids
    if ids is not None and len(entries) != len(ids):
        raise ValueError(f"{len(entries)} prompt_logprobs entries for a prompt of {len(ids)} tokens")
    logprobs: list[float | None] = []
    recovered: list[int] = []
    topk_ids: list[list[int]] = []
    topk_logprobs: list[list[float]] = []
    for i, entry in enumerate(entries):
        if entry is None:
            logprobs.append(None)
            recovered.append(-1)
            topk_ids.append([])
            topk_logprobs.append([])
            continue
        if not isinstance(entry, dict) or not entry:
            raise ValueError(f"prompt_logprobs[{i}] is not an object of token id -> logprob")
        key = str(ids[i]) if ids is not None else next(iter(entry))
        if key not in entry:
            raise ValueError(f"prompt_logprobs[{i}] has no entry for the prompt's token id {key}")
        logprobs.append(_entry_logprob(entry[key], f"prompt_logprobs[{i}][{key!r}]"))
        recovered.append(int(key))
        if top_k:
            if not all(k.lstrip("-").isdigit() for k in entry):
                raise ValueError(f"prompt_logprobs[{i}] has keys that are not token ids")
            top_ids, top_lps = _top(entry, top_k, f"prompt_logprobs[{i}]")
            topk_ids.append(top_ids)
            topk_logprobs.append(top_lps)
    if token_ids is None and prompt_ids is None:
        token_ids = recovered  # -1 where the server gave no entry (position 0)
    if not top_k:
        return PromptScores(logprobs=logprobs, token_ids=token_ids)
    return PromptScores(logprobs=logprobs, token_ids=token_ids, topk_ids=topk_ids, topk_logprobs=topk_logprobs)


def stored_scores_problem(response: Any) -> str | None:
    """What is wrong with a cached score ({"logprobs": [float | None], "token_ids": [int] | None, "topk_ids":
    [[int]] | None, "topk_logprobs": [[float]] | None}), or None. Logprobs are checked as on entry: an entry
    written before the checks existed (a -1e30 from a broken teacher) is a miss, asked again."""
    if not isinstance(response, dict):
        return f"has a response of type {type(response).__name__}, not an object"
    logprobs = response.get("logprobs")
    if not isinstance(logprobs, list) or not all(v is None or usable_logprob(v) for v in logprobs):
        return "has no list of usable logprobs (finite numbers in [-1000, 0], or null) in its response"
    token_ids = response.get("token_ids")
    if token_ids is not None and not (isinstance(token_ids, list) and all(isinstance(t, int) for t in token_ids)):
        return "has token_ids that are not a list of integers"
    top_ids, top_lps = response.get("topk_ids"), response.get("topk_logprobs")
    if (top_ids is None) != (top_lps is None):
        return "has one of topk_ids / topk_logprobs without the other"
    if top_ids is not None:
        if not (isinstance(top_ids, list) and isinstance(top_lps, list) and len(top_ids) == len(top_lps) == len(logprobs)):
            return "has top-k lists of another length than its logprobs"
        for row_ids, row_lps in zip(top_ids, top_lps, strict=True):
            if not (isinstance(row_ids, list) and isinstance(row_lps, list) and len(row_ids) == len(row_lps)
                    and all(isinstance(t, int) and not isinstance(t, bool) for t in row_ids)
                    and all(usable_logprob(v) for v in row_lps)):  # fmt: skip
                return "has a top-k row that is not ids with usable logprobs"
    return None


class TeacherScoringClient:
    """Scores token sequences on a teacher's completions API (`score`, `score_sample`), top-k when `top_k > 0`."""

    def __init__(
        self,
        endpoint: EndpointConfig,
        *,
        max_concurrency: int,
        cache_dir: Path | None,
        top_k: int = 0,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        jitter_seed: int | None = None,
        budget: Budget | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.top_k = top_k
        self._session = EndpointSession(
            endpoint, f"{endpoint.base_url}/completions", max_concurrency=max_concurrency,
            max_response_bytes=endpoint.max_response_bytes or _BASE_RESPONSE_BYTES, backoff_base_s=backoff_base_s,
            backoff_max_s=backoff_max_s, jitter_seed=jitter_seed, section="orchestrator.teacher_model", budget=budget,
        )  # fmt: skip
        self._counters = self._session.counters
        self._cache = ResponseCache(cache_dir, check=stored_scores_problem) if cache_dir is not None else None
        self._shared = SharedRequests(on_shared=lambda: self._session.count("shared_requests"))

    def build_score_request(self, prompt: list[int] | str, *, return_token_ids: bool = False) -> dict[str, Any]:
        """The exact JSON body of one scoring request (also the cache key's request part)."""
        body: dict[str, Any] = {"model": self.endpoint.model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0,
                                "prompt_logprobs": self.top_k}  # fmt: skip
        if return_token_ids:
            body["return_token_ids"] = True
        return body

    def _max_bytes(self, prompt: list[int] | str) -> int:
        """The response cap of one request: the base plus (k + 1) entries per prompt token."""
        if self.endpoint.max_response_bytes is not None:
            return self.endpoint.max_response_bytes
        tokens = len(prompt) if isinstance(prompt, list) else len(prompt.encode("utf-8"))
        return _BASE_RESPONSE_BYTES + _BYTES_PER_ENTRY * (self.top_k + 2) * tokens

    async def score(self, prompt: list[int] | str, *, return_token_ids: bool = False) -> PromptScores:
        """The teacher's logprob (and top-k) of every prompt token after its prefix. Raises `ClientError` when it
        fails for good or returns a logprob that must not be trained on (never cached).

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
                return PromptScores(logprobs=stored["logprobs"], token_ids=stored.get("token_ids"),
                                    topk_ids=stored.get("topk_ids"), topk_logprobs=stored.get("topk_logprobs"))  # fmt: skip
        prompt_ids = prompt if isinstance(prompt, list) else None

        def read(raw: RawResponse, data: Any) -> tuple[PromptScores, dict[str, Any]]:
            usage: dict[str, Any] = data["usage"] if isinstance(data, dict) and isinstance(data.get("usage"), dict) else {}
            try:
                return parse_prompt_logprobs(data, prompt_ids, self.top_k), usage
            except BadLogprob as e:  # a broken teacher: set this sample aside, cache nothing, no retry
                raise ClientError(e.kind, f"{self.endpoint.base_url}/completions: {e}") from None
            except ValueError as e:
                self._counters["teacher/malformed"] += 1
                # A server that does not score prompts (or scores other tokens) does so on every request: no retry.
                raise ClientError("malformed", f"{self.endpoint.base_url}/completions: {e}") from None

        async def request() -> PromptScores:
            result = await self._session.scoring_request(body, read, max_bytes=self._max_bytes(prompt))
            if use_cache:
                assert self._cache is not None
                stored_answer: dict[str, Any] = {"logprobs": result.logprobs, "token_ids": result.token_ids}
                if result.topk_ids is not None:
                    stored_answer.update(topk_ids=result.topk_ids, topk_logprobs=result.topk_logprobs)
                self._cache.put(body, "", stored_answer)
            return result

        if not use_cache:  # text prompts and the probe's clients (which must ask the teacher every time)
            return await request()
        return await self._shared.run(cache_digest(body, ""), request)

    async def score_sample(self, token_ids: list[int], loss_mask: list[bool]) -> SampleScores:
        """A sample's teacher scores on its loss tokens. A loss token without a teacher logprob (or, with top_k, an
        empty top-k) is a `ClientError("malformed")`: a silent 0.0 there would be trained as if it were a score."""
        scores = await self.score(token_ids)
        out: list[float] = []
        for i, (lp, m) in enumerate(zip(scores.logprobs, loss_mask, strict=True)):
            if m and lp is None:
                self._counters["teacher/errors/malformed"] += 1
                raise ClientError("malformed", f"the teacher returned no logprob for trained token {i} of {len(token_ids)}")
            out.append(lp if m and lp is not None else 0.0)
        if not self.top_k:
            return SampleScores(out)
        assert scores.topk_ids is not None and scores.topk_logprobs is not None
        k = self.top_k
        ids_T_k: list[list[int]] = []
        lps_T_k: list[list[float]] = []
        for i, (row_ids, row_lps, m) in enumerate(zip(scores.topk_ids, scores.topk_logprobs, loss_mask, strict=True)):
            if not m:
                ids_T_k.append([-1] * k)
                lps_T_k.append([0.0] * k)
                continue
            if not row_ids:
                self._counters["teacher/errors/malformed"] += 1
                raise ClientError("malformed", f"the teacher returned no top-k for trained token {i} of {len(token_ids)}")
            ids_T_k.append(list(row_ids[:k]) + [-1] * (k - len(row_ids[:k])))
            lps_T_k.append(list(row_lps[:k]) + [0.0] * (k - len(row_lps[:k])))
        return SampleScores(out, ids_T_k, lps_T_k)

    def metrics(self, reset: bool = False) -> dict[str, float]:
        """Counters under `distill/` (requests, retries, cache_hits, responses, errors/<kind>, latency_s, ...)."""
        return {k.replace("teacher/", "distill/", 1): v for k, v in self._session.metrics(reset).items()}

    async def aclose(self) -> None:
        await self._session.aclose()
