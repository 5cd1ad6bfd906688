"""On-policy distillation's arithmetic: teacher logprobs of the student's own tokens -> per-token advantages.

The student samples a completion; the teacher scores every sampled token after the same prefix
(`clients/scoring.py`). For a loss token t with student sampling logprob s_t and teacher logprob q_t,

    advantage_t = kl_coef * (q_t - s_t) + reward_coef * A

where A is the sample's group-relative reward advantage. s_t - q_t is a one-sample estimate of the reverse KL
KL(student || teacher) at that position, so the first term rewards exactly the tokens the teacher likes more
than the student does, and the rl loss (importance ratio times advantage) turns that into a policy gradient on
the reverse KL. The orchestrator logs `distill/reverse_kl`, the mean of s_t - q_t over completion tokens.

With `on_policy_distill.top_k = k > 0` the scoring request asks for the teacher's top-k at every position, and
the sample carries them as soft targets (`teacher_topk_ids` / `teacher_topk_logprobs`) for the `distill` loss,
which learns the teacher's distribution rather than a one-sample estimate; no advantages are set. Logged too:
`distill/topk_mass`, the teacher probability its top-k covers (mean over completion tokens; 1 - it is the tail
the loss lumps into one bucket). `distill/forward_kl` needs the student's probabilities of the teacher's top-k
ids, which only the trainer computes: it is the trainer's metric (the distill loss's), not the orchestrator's.

A teacher with another tokenizer (apprentice.crosstok) gives, per student token, an equivalent q_t: the student's
s_t plus the token's share of the teacher-minus-student log-ratio of its byte-aligned chunk of text, so the
same formula applies and the per-sample sum of q_t - s_t is the log-ratio of the whole completion text.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apprentice.clients.base import Budget, ClientError
from apprentice.clients.echo import EchoScoringClient
from apprentice.clients.scoring import PromptScores, SampleScores, TeacherScoringClient
from apprentice.config.orchestrator import EndpointConfig, OnPolicyDistillConfig, TeacherEndpointConfig
from apprentice.crosstok.align import AlignError
from apprentice.crosstok.endpoint import RemoteTokenizer, tokenizer_server
from apprentice.crosstok.llamacpp_tokenize import LlamaCppTokenizer
from apprentice.crosstok.probe import probe_teacher
from apprentice.crosstok.scorer import CrossTokenizerScorer, StepIndex, index_steps
from apprentice.crosstok.teacher import TeacherSide
from apprentice.crosstok.vllm_tokenize import VllmTokenizer
from apprentice.types import TrainingSample


def distill_token_advantages(
    student_logprobs: list[float],
    teacher_logprobs: list[float],
    loss_mask: list[bool],
    group_advantage: float,
    *,
    kl_coef: float,
    reward_coef: float,
) -> list[float]:
    """[T] per-token advantages: kl_coef * (teacher - student) + reward_coef * group_advantage on loss tokens, 0.0
    elsewhere (those positions are never trained; 0.0 keeps the column finite)."""
    if not len(student_logprobs) == len(teacher_logprobs) == len(loss_mask):
        raise ValueError(
            f"lengths differ: student {len(student_logprobs)}, teacher {len(teacher_logprobs)}, mask {len(loss_mask)}"
        )
    reward_term = reward_coef * group_advantage
    return [
        kl_coef * (q - s) + reward_term if m else 0.0
        for s, q, m in zip(student_logprobs, teacher_logprobs, loss_mask, strict=True)
    ]


@dataclass
class ReverseKL:
    """Running sum of (student - teacher) logprob over loss tokens; `mean` is `distill/reverse_kl`."""

    total: float = 0.0
    tokens: int = 0

    def add(self, sample: TrainingSample, teacher_logprobs: list[float]) -> None:
        for s, q, m in zip(sample.logprobs, teacher_logprobs, sample.loss_mask, strict=True):
            if m:
                self.total += s - q
                self.tokens += 1

    @property
    def mean(self) -> float:
        return self.total / self.tokens if self.tokens else 0.0


def apply_teacher_scores(
    sample: TrainingSample, teacher_logprobs: list[float], cfg: OnPolicyDistillConfig, reverse_kl: ReverseKL
) -> TrainingSample:
    """Set `sample.token_advantages` from the teacher's logprobs of its tokens; `sample.advantage` (the group
    reward advantage, already computed) is kept for reference and enters through reward_coef."""
    sample.token_advantages = distill_token_advantages(
        sample.logprobs, teacher_logprobs, sample.loss_mask, sample.advantage,
        kl_coef=cfg.kl_coef, reward_coef=cfg.reward_coef,
    )  # fmt: skip
    reverse_kl.add(sample, teacher_logprobs)
    return sample


@dataclass
class TopkMass:
    """Running mean over loss tokens of the teacher probability its top-k covers: `distill/topk_mass`."""

    total: float = 0.0
    tokens: int = 0

    def add(self, topk_logprobs: list[list[float]], topk_ids: list[list[int]], loss_mask: list[bool]) -> None:
        for row_lps, row_ids, m in zip(topk_logprobs, topk_ids, loss_mask, strict=True):
            if m:
                self.total += sum(math.exp(lp) for lp, t in zip(row_lps, row_ids, strict=True) if t >= 0)
                self.tokens += 1

    @property
    def mean(self) -> float:
        return self.total / self.tokens if self.tokens else 0.0


def apply_topk_targets(sample: TrainingSample, scores: SampleScores, reverse_kl: ReverseKL, mass: TopkMass) -> TrainingSample:
    """Set the sample's soft targets (top_k > 0): the teacher's top-k rows, -1 off the loss mask."""
    assert scores.topk_ids is not None and scores.topk_logprobs is not None
    sample.teacher_topk_ids = scores.topk_ids
    sample.teacher_topk_logprobs = scores.topk_logprobs
    reverse_kl.add(sample, scores.logprobs)
    mass.add(scores.topk_logprobs, scores.topk_ids, sample.loss_mask)
    return sample


def logprobs_on_mask(scores: PromptScores, loss_mask: list[bool]) -> SampleScores:
    """A sample's teacher logprobs of its own tokens, 0.0 off the loss mask; a loss token without one is a
    ClientError("malformed") (a silent 0.0 there would be trained as if it were a score)."""
    if len(scores.logprobs) != len(loss_mask):
        raise ClientError("malformed", f"{len(scores.logprobs)} teacher logprobs for {len(loss_mask)} tokens")
    out: list[float] = []
    for i, (lp, m) in enumerate(zip(scores.logprobs, loss_mask, strict=True)):
        if m and lp is None:
            raise ClientError("malformed", f"the teacher returned no logprob for trained token {i} of {len(loss_mask)}")
        out.append(lp if m and lp is not None else 0.0)
    return SampleScores(out)


class OnPolicyDistiller:
    """The orchestrator's on-policy distillation step: after the student's samples are rendered (token path,
    group advantages set), score each with the teacher and turn the scores into per-token advantages (or, with
    top_k > 0, soft targets).

    At startup `probe` finds whether the teacher shares the student's token ids, which scoring protocol its
    endpoint speaks and how noisy it is (crosstok/probe.py). Same ids: one request per sample scores the
    student's own ids (the original path). Another tokenizer: one request per trained turn scores the student's
    text after the conversation in the teacher's template, aligned by bytes (crosstok/scorer.py).

    Requests run concurrently (bounded by orchestrator.max_concurrency), cached under OUTPUT/teacher_cache. A
    sample whose scoring fails for good, or whose text cannot be aligned, is set aside and counted
    (`distill/set_aside/<kind>`), like a failed rollout; the step goes on with the others.
    """

    def __init__(self, endpoint: EndpointConfig, cfg: OnPolicyDistillConfig | None, *, max_concurrency: int,
                 cache_dir: Path | None, budget: Budget | None = None) -> None:  # fmt: skip
        self.cfg = cfg or OnPolicyDistillConfig()
        self.endpoint = (endpoint if isinstance(endpoint, TeacherEndpointConfig)
                         else TeacherEndpointConfig.model_validate(endpoint.model_dump()))  # fmt: skip
        self.budget = budget
        """The run's spend ledger: every scoring answer (the probe's too) is charged to it; none is sent once a cap
        of the teacher endpoint is reached (`SpendCapReached`, which `apply` raises rather than sets aside)."""
        self.client = TeacherScoringClient(self.endpoint, max_concurrency=max_concurrency, cache_dir=cache_dir,
                                           top_k=self.cfg.top_k, budget=budget)  # fmt: skip
        self.echo = EchoScoringClient(self.endpoint, max_concurrency=max_concurrency, cache_dir=cache_dir, budget=budget)
        self.protocol = "prompt_logprobs"
        self.cross: CrossTokenizerScorer | None = None
        self.max_concurrency = max_concurrency
        self.remote: RemoteTokenizer | None = None
        """The teacher's tokenizing server (vLLM /tokenize or llama.cpp), when the cross-tokenizer path renders
        over it."""
        self.noise: float | None = None
        self.first_errors: dict[str, str] = {}
        """The last `apply`'s first error message per kind of set-aside sample (for the empty-step message)."""

    async def probe(self, student_tokenizer: Any) -> None:
        """The startup probe (crosstok/probe.py): tokenizer, protocol, top-k width, self-test; ConfigError with
        the fix. The probe's own clients have no cache: the self-test asks the teacher itself twice."""
        probing = TeacherScoringClient(self.endpoint, max_concurrency=1, cache_dir=None, top_k=self.cfg.top_k,
                                       budget=self.budget)  # fmt: skip
        echo = EchoScoringClient(self.endpoint, max_concurrency=1, cache_dir=None, budget=self.budget)
        remotes: list[RemoteTokenizer] = []  # use_endpoint_tokenize = false: the local tokenizer only (config checks it)
        if self.endpoint.use_endpoint_tokenize:
            server = tokenizer_server(self.endpoint)
            remotes = [VllmTokenizer(server, max_concurrency=self.max_concurrency),
                       LlamaCppTokenizer(server, max_concurrency=self.max_concurrency)]  # fmt: skip
        found = None
        try:
            found = await probe_teacher(self.endpoint, probing, echo, student_tokenizer, remotes)
        finally:
            await probing.aclose()
            await echo.aclose()
            self.remote = found.remote.remote if found is not None and found.remote is not None else None
            for remote in remotes:  # the one in use is closed with the distiller
                if remote is not self.remote:
                    await remote.aclose()
        self.protocol, self.noise = found.protocol, found.noise
        if self.remote is not None:
            self.remote.metrics(reset=True)  # the probe's own requests are not step 1's
        if not found.same_tokenizer:
            scorer = self.client if self.protocol == "prompt_logprobs" else self.echo
            side = found.remote or TeacherSide(found.teacher_tokenizer, student_tokenizer)
            self.cross = CrossTokenizerScorer(side, scorer, spread=self.endpoint.spread)

    async def _score(self, sample: TrainingSample, steps: StepIndex) -> SampleScores:
        if self.cross is not None:
            return SampleScores(await self.cross.score_sample(sample, steps))
        if self.protocol == "prompt_logprobs":
            return await self.client.score_sample(sample.token_ids, sample.loss_mask)  # the original path
        return logprobs_on_mask(await self.echo.score(sample.token_ids), sample.loss_mask)

    async def apply(self, samples: list[TrainingSample], trajectories: list[dict[str, Any]] | None = None
                    ) -> tuple[list[TrainingSample], dict[str, float]]:  # fmt: skip
        """(the samples that were scored, with token_advantages or top-k targets set; `distill/*` metrics of this
        step). `trajectories` (the ones the samples were rendered from) give a teacher of another tokenizer the
        conversation."""
        steps = index_steps(trajectories or []) if self.cross is not None else {}
        results = await asyncio.gather(*(self._score(s, steps) for s in samples), return_exceptions=True)
        reverse_kl, mass = ReverseKL(), TopkMass()
        kept: list[TrainingSample] = []
        set_aside: Counter[str] = Counter()
        self.first_errors = {}
        for sample, result in zip(samples, results, strict=True):
            if isinstance(result, ClientError | AlignError):
                set_aside[result.kind] += 1
                self.first_errors.setdefault(result.kind, str(result))
                continue
            if isinstance(result, BaseException):
                raise result
            if self.cfg.top_k:
                kept.append(apply_topk_targets(sample, result, reverse_kl, mass))
            else:
                kept.append(apply_teacher_scores(sample, result.logprobs, self.cfg, reverse_kl))
        metrics = {"distill/reverse_kl": reverse_kl.mean, "distill/scored_tokens": float(reverse_kl.tokens),
                   "distill/scored_samples": float(len(kept))}  # fmt: skip
        if self.cfg.top_k:
            metrics["distill/topk_mass"] = mass.mean
        if self.noise is not None:
            metrics["distill/teacher_noise"] = self.noise
        metrics.update({f"distill/set_aside/{kind}": float(n) for kind, n in set_aside.items()})
        metrics.update(self.echo.metrics(reset=True) if self.protocol == "echo" else self.client.metrics(reset=True))
        if self.cross is not None:
            metrics.update(self.cross.chunk_metrics(reset=True))
        if self.remote is not None:  # the teacher side over a tokenizing server: its requests, retries, latency
            metrics.update(self.remote.metrics(reset=True))
        return kept, metrics

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.echo.aclose()
        if self.remote is not None:
            await self.remote.aclose()
