"""Score a student sample with a teacher of another tokenizer: per trained turn, one teacher request for the
teacher-side sequence (teacher.py), then byte alignment (align.py) into one value per student token.

The values come back as *equivalent teacher logprobs* q_t = s_t + v_t (s_t the student's sampling logprob,
v_t the token's share of its chunk's teacher-minus-student log-ratio), so the same-tokenizer arithmetic
(orchestrator/on_policy.py: advantage_t = kl_coef * (q_t - s_t) + reward_coef * A) applies unchanged and
`distill/reverse_kl` stays the mean of s_t - q_t over completion tokens: per sample, sum_t (q_t - s_t) is
exactly log p_teacher(text) - log p_student(text), end of turn included.

A sample's turns are found in its trajectory by their ids: the step whose prompt_ids + completion_ids equal the
sample's tokens up to the end of that masked run (render/tokens.py builds samples exactly so).
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from apprentice.clients.base import ClientError
from apprentice.clients.scoring import PromptScores
from apprentice.crosstok.align import AlignError, Completion, Spread, completion_chunks, token_values
from apprentice.crosstok.teacher import TeacherSide
from apprentice.crosstok.token_bytes import UnsupportedTokenizer
from apprentice.types import TrainingSample


class Scorer(Protocol):
    async def score(self, prompt: list[int]) -> PromptScores: ...


StepIndex = dict[tuple[int, ...], tuple[dict[str, Any], list[dict[str, Any]] | None]]
"""prompt_ids + completion_ids of a step -> (the step, its trajectory's tools)."""


def index_steps(trajectories: list[dict[str, Any]]) -> StepIndex:
    out: StepIndex = {}
    for trajectory in trajectories:
        for step in trajectory.get("steps") or []:
            tokens = step.get("tokens")
            if tokens:
                out[tuple(tokens["prompt_ids"]) + tuple(tokens["completion_ids"])] = (step, trajectory.get("tools"))
    return out


def masked_runs(mask: list[bool]) -> list[tuple[int, int]]:
    """[start, end) of every run of True in `mask`."""
    runs: list[tuple[int, int]] = []
    for i, m in enumerate(mask):
        if m and (i == 0 or not mask[i - 1]):
            runs.append((i, i + 1))
        elif m:
            runs[-1] = (runs[-1][0], i + 1)
    return runs


class CrossTokenizerScorer:
    """Equivalent teacher logprobs of a student sample's tokens, from a teacher of another tokenizer."""

    def __init__(self, side: TeacherSide, scorer: Scorer, *, spread: Spread = "even") -> None:
        self.side = side
        self.scorer = scorer
        self.spread = spread
        self.tokens = 0
        """Student tokens scored (all turns) since the last `chunk_metrics(reset=True)`."""
        self.multi_tokens = 0
        """Of those, the ones in a chunk of several student tokens (where the spread rule matters)."""

    async def turn_values(self, step: dict[str, Any], tools: list[dict[str, Any]] | None, completion_ids: list[int],
                          student_logprobs: list[float]) -> list[float]:  # fmt: skip
        """[len(completion_ids)] per-token values v_t of one turn (AlignError / ClientError when it cannot be scored)."""
        turn = await self.side.teacher_turn(step["prompt"], step.get("completion") or [], tools, completion_ids)
        scores = await self.scorer.score(turn.ids)
        teacher_lps = scores.logprobs[turn.completion_start :]
        if len(scores.logprobs) != len(turn.ids) or any(lp is None for lp in teacher_lps):
            raise ClientError("malformed", "the teacher returned no logprob for some completion token")
        teacher_ids = turn.ids[turn.completion_start :]
        n = turn.student_scored  # the tokens of an unfinished last character (cut-off turn) get no value
        student = Completion(self.side.student_bytes(completion_ids[:n]), student_logprobs[:n], turn.ends_turn)
        teacher_bytes = turn.completion_bytes if turn.completion_bytes is not None else self.side.teacher_bytes(teacher_ids)
        teacher = Completion(teacher_bytes, [float(lp) for lp in teacher_lps if lp is not None],
                             turn.ends_turn)  # fmt: skip
        parts = completion_chunks(student, teacher)
        values = token_values(student.logprobs, teacher.logprobs, parts, spread=self.spread)
        self.tokens += n
        self.multi_tokens += sum(c.s_end - c.s_start for c in parts if c.s_end - c.s_start > 1)
        return values + [0.0] * (len(completion_ids) - n)

    def chunk_metrics(self, reset: bool = False) -> dict[str, float]:
        """`distill/multi_token_chunks`: the share of scored student tokens that sit in a chunk of several student
        tokens, whose value the `spread` rule distributes (0 when nothing was scored)."""
        out = {"distill/multi_token_chunks": self.multi_tokens / self.tokens if self.tokens else 0.0}
        if reset:
            self.tokens = self.multi_tokens = 0
        return out

    async def score_sample(self, sample: TrainingSample, steps: StepIndex) -> list[float]:
        """[T] equivalent teacher logprobs (s_t + v_t) on the sample's loss tokens, 0.0 elsewhere."""
        runs = masked_runs(sample.loss_mask)
        found = []
        for _, end in runs:
            hit = steps.get(tuple(sample.token_ids[:end]))
            if hit is None:
                raise AlignError("no_messages", "a trained turn has no step with its messages in the trajectory")
            found.append(hit)
        try:
            values = await asyncio.gather(*(
                self.turn_values(step, tools, sample.token_ids[start:end], sample.logprobs[start:end])
                for (start, end), (step, tools) in zip(runs, found, strict=True)
            ))  # fmt: skip
        except UnsupportedTokenizer as e:  # a piece whose bytes cannot be read (checked on a probe at startup)
            raise AlignError("token_bytes", str(e)) from None
        out = [0.0] * len(sample)
        for (start, _), turn in zip(runs, values, strict=True):
            for i, v in enumerate(turn):
                out[start + i] = sample.logprobs[start + i] + v
        return out
