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
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apprentice.clients.base import ClientError
from apprentice.clients.scoring import PromptScores, SampleScores, TeacherScoringClient
from apprentice.config.orchestrator import EndpointConfig, OnPolicyDistillConfig
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


# Plain text with spaces, digits, punctuation, accents, CJK and an emoji: tokenizers that differ anywhere in
# pre-tokenization, merges or byte fallback give different ids for it.
PROBE_TEXT = "Tokenizer probe: The quick brown fox, 1234567 + 89.5%; naïve café — 東京 🙂\n\tif (x) { return y; }"


def _mismatch_message(teacher: str, student: str, where: str) -> str:
    return (
        f"orchestrator.teacher_model ({teacher}) does not share the student's tokenizer (model.name = {student}): "
        f"{where}. On-policy distillation sends the teacher the student's own token ids and reads back one logprob "
        f"per id; under a different tokenizer those ids are other text (or no token at all), so the teacher would "
        f"grade tokens the student never wrote and there is no token-by-token correspondence to fix that. Use a "
        f"teacher with the student's tokenizer (same model family), or distill off-policy with "
        f"[orchestrator.rollout_model] instead (the teacher writes text, re-tokenized for the student: any tokenizer)."
    )


def _first_difference(a: list[int], b: list[int]) -> str:
    i = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return f"the probe text gives {len(a)} teacher ids and {len(b)} student ids, first different at position {i}"


def check_local_teacher_tokenizer(teacher_dir: Path, student_tokenizer: Any, student_name: str) -> None:
    """The teacher is a local model directory: compare its tokenizer files' vocabulary and probe ids with the
    student's. Raises ConfigError on any difference."""
    from transformers import AutoTokenizer

    from apprentice.config import ConfigError

    teacher = AutoTokenizer.from_pretrained(teacher_dir)
    if teacher.get_vocab() != student_tokenizer.get_vocab():
        raise ConfigError(_mismatch_message(str(teacher_dir), student_name, "their vocabularies differ"))
    t_ids, s_ids = teacher(PROBE_TEXT)["input_ids"], student_tokenizer(PROBE_TEXT)["input_ids"]
    if t_ids != s_ids:
        raise ConfigError(_mismatch_message(str(teacher_dir), student_name, _first_difference(t_ids, s_ids)))


async def check_teacher_tokenizer(client: TeacherScoringClient, student_tokenizer: Any, student_name: str) -> None:
    """At startup: the teacher must tokenize a probe text exactly as the student does. A local directory as
    teacher_model.model is checked from its files; otherwise the teacher endpoint scores the probe as text and
    its ids are compared (its `prompt_token_ids`, or the ids its prompt_logprobs entries are keyed by)."""
    from apprentice.config import ConfigError

    endpoint = client.endpoint
    if Path(endpoint.model).is_dir():
        check_local_teacher_tokenizer(Path(endpoint.model), student_tokenizer, student_name)
        return
    s_ids: list[int] = student_tokenizer(PROBE_TEXT)["input_ids"]
    try:
        scores = await client.score(PROBE_TEXT, return_token_ids=True)
    except ClientError as e:
        if client.top_k and e.kind == "bad_request":
            raise ConfigError(
                f"orchestrator.on_policy_distill.top_k = {client.top_k}: the teacher ({endpoint.base_url}, model "
                f"{endpoint.model!r}) refused prompt_logprobs = {client.top_k} at startup ({e}). vLLM returns at most "
                f"its --max-logprobs (20 by default), `apprentice serve` 20: lower top_k, or raise the server's limit."
            ) from None
        raise ConfigError(
            f"orchestrator.teacher_model ({endpoint.base_url}, model {endpoint.model!r}) could not score a probe "
            f"text at startup: {e}. On-policy distillation needs a teacher that returns prompt logprobs on its "
            f"completions API (vLLM, `apprentice serve`)."
        ) from None
    if client.top_k:
        check_topk_width(scores, client)
    t_ids = scores.token_ids or []
    # Without prompt_token_ids the first id is unknown (entry 0 has no logprob): compare from position 1.
    if t_ids and t_ids[0] == -1:
        t_ids, s_ids = t_ids[1:], s_ids[1:]
    if t_ids != s_ids:
        where = f"{endpoint.base_url}, model {endpoint.model!r}"
        raise ConfigError(_mismatch_message(where, student_name, _first_difference(t_ids, s_ids)))


def check_topk_width(scores: PromptScores, client: TeacherScoringClient) -> None:
    """The probe's answer must hold top_k entries per position: a server that silently returns fewer would
    train on truncated distributions (a bigger tail than the user asked for)."""
    from apprentice.config import ConfigError

    widths = [len(row) for row in scores.topk_ids or [] if row]
    if not widths or min(widths) < client.top_k:
        endpoint = client.endpoint
        raise ConfigError(
            f"orchestrator.on_policy_distill.top_k = {client.top_k}, but the teacher ({endpoint.base_url}, model "
            f"{endpoint.model!r}) returned at most {max(widths, default=0)} candidates per position when probed at "
            f"startup: lower top_k to {min(widths, default=0)} or serve the teacher with a higher logprobs limit."
        )


class OnPolicyDistiller:
    """The orchestrator's on-policy distillation step: after the student's samples are rendered (token path,
    group advantages set), score each with the teacher and turn the scores into per-token advantages.

    One scoring request per sample, concurrently (bounded by orchestrator.max_concurrency), cached under
    OUTPUT/teacher_cache. A sample whose scoring fails for good is set aside and counted
    (`distill/set_aside/<kind>`), like a failed rollout; the step goes on with the others.
    """

    def __init__(self, endpoint: EndpointConfig, cfg: OnPolicyDistillConfig | None, *, max_concurrency: int,
                 cache_dir: Path | None) -> None:  # fmt: skip
        self.cfg = cfg or OnPolicyDistillConfig()
        self.client = TeacherScoringClient(endpoint, max_concurrency=max_concurrency, cache_dir=cache_dir,
                                           top_k=self.cfg.top_k)  # fmt: skip
        self.first_errors: dict[str, str] = {}
        """The last `apply`'s first error message per kind of set-aside sample (for the empty-step message)."""

    async def check_tokenizer(self, student_tokenizer: Any, student_name: str) -> None:
        await check_teacher_tokenizer(self.client, student_tokenizer, student_name)

    async def apply(self, samples: list[TrainingSample]) -> tuple[list[TrainingSample], dict[str, float]]:
        """(the samples that were scored, with token_advantages set; `distill/*` metrics of this step)."""
        results = await asyncio.gather(
            *(self.client.score_sample(s.token_ids, s.loss_mask) for s in samples), return_exceptions=True
        )
        reverse_kl, mass = ReverseKL(), TopkMass()
        kept: list[TrainingSample] = []
        set_aside: Counter[str] = Counter()
        self.first_errors = {}
        for sample, result in zip(samples, results, strict=True):
            if isinstance(result, ClientError):
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
        metrics.update({f"distill/set_aside/{kind}": float(n) for kind, n in set_aside.items()})
        metrics.update(self.client.metrics(reset=True))
        return kept, metrics

    async def aclose(self) -> None:
        await self.client.aclose()
