"""Off-policy soft targets: a chat teacher's `top_logprobs` -> the student's `teacher_topk_ids/_logprobs`.

With `[orchestrator.sampling] top_logprobs = k` every teacher turn carries, per generated token, its bytes, its
logprob and its k most likely alternatives (`TrajectoryStep["teacher_logprobs"]`). After render, each trained
turn of a sample (a run of loss-mask tokens, in order) is matched to its teacher turn, token by token from the
turn's first token:

  - the teacher's token, by its bytes, must be exactly one ordinary student token and equal to the student's
    token at that position (the student's re-tokenization of the teacher's text equals the teacher's tokens).
    At the first position where it is not (`unmapped_token`: bytes no student token has, or several have;
    `retokenized`: the student splits the text differently), matching stops for the rest of the turn: after it
    the two prefixes are no longer the same token sequence;
  - a matched position gets soft targets when every one of its top-k alternatives maps to exactly one distinct
    student id (`unmapped_alternative` otherwise; the position keeps plain NLL). An alternative may be a special
    token of the student (its end-of-turn token, named by its text, as `apprentice serve` and vLLM name it): the
    teacher's probability of stopping there is a target too. A teacher token that is a special token matches only
    the student's own end-of-turn token at that position (servers that report the stop token, like `apprentice
    serve` and vLLM, give it logprobs); special-token text inside content is set aside by render anyway;
  - trained tokens the teacher never scored (the end-of-turn token, a reasoning block the API gives no logprobs
    for) keep plain NLL (`not_scored`).

Uncovered positions train on the NLL of the sampled token (the distill loss does this where a row is all -1).
Metrics: `distill/topk/covered_fraction` (covered loss tokens / loss tokens), `distill/topk/uncovered/<kind>`
(token counts), `distill/topk_mass` (teacher probability its top-k covers, over covered positions).

Which pairs map: a teacher and a student with the same tokenizer map fully (a Qwen API into a Qwen student, a
DeepSeek API into a DeepSeek-distilled student); different tokenizers map almost nowhere, and the run refuses
to start (`probe_top_logprobs`), since soft targets would be a paid-for no-op.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from apprentice.clients.base import ChatClient, ClientError
from apprentice.errors import UsageError
from apprentice.render import render_many
from apprentice.render.stats import RenderStats
from apprentice.tokenbytes import bytes_to_id
from apprentice.types import TrainingSample

PROBE_MESSAGES = [{"role": "user", "content": "Write one short sentence about the sea, then the numbers 1 to 5."}]
PROBE_KEY = "startup/top_logprobs_probe"


@dataclass
class Coverage:
    """Counts of one step: covered loss tokens, all loss tokens, uncovered ones by kind, top-k mass."""

    covered: int = 0
    total: int = 0
    uncovered: Counter[str] = field(default_factory=Counter)
    mass: float = 0.0

    def metrics(self) -> dict[str, float]:
        out = {"distill/topk/covered_fraction": self.covered / self.total if self.total else 0.0,
               "distill/topk_mass": self.mass / self.covered if self.covered else 0.0}  # fmt: skip
        out.update({f"distill/topk/uncovered/{kind}": float(n) for kind, n in self.uncovered.items()})
        return out


class StudentVocab:
    """The student's bytes -> id map (apprentice/tokenbytes.py), built once per run."""

    def __init__(self, tokenizer: Any) -> None:
        self.ids = bytes_to_id(tokenizer)
        self.special = bytes_to_id(tokenizer, special=True)

    def one(self, raw: list[int]) -> int | None:
        """The one ordinary student id with exactly these bytes, or None (also for replacement bytes)."""
        key = bytes(raw)
        return None if REPLACEMENT in key else self.ids.get(key)

    def alternative(self, raw: list[int]) -> int | None:
        """An alternative's student id: an ordinary token, else a special token with exactly this text, or None
        (also for replacement bytes)."""
        key = bytes(raw)
        if REPLACEMENT in key:
            return None
        return self.ids[key] if key in self.ids else self.special.get(key)


REPLACEMENT = "\ufffd".encode()
"""U+FFFD's UTF-8 bytes. vLLM names each top-k token by decoding it alone, so a token that is part of a character
(an emoji's first bytes, a CJK byte piece) arrives as "\ufffd" with these bytes instead of its own: mapped, it would
put the teacher's probability on the student's literal "\ufffd" token (SmolLM2 has one). Such an entry is not
mapped (`unmapped_alternative`); a literal "\ufffd" is never a target worth having."""


def _runs(mask: list[bool]) -> list[tuple[int, int]]:
    """[start, end) of each run of True."""
    runs, start = [], None
    for i, m in enumerate([*mask, False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _fill_turn(sample: TrainingSample, start: int, end: int, turn: list[dict[str, Any]] | None, vocab: StudentVocab,
               k: int, cov: Coverage) -> None:  # fmt: skip
    assert sample.teacher_topk_ids is not None and sample.teacher_topk_logprobs is not None
    pos, stopped = start, turn is None
    for token in turn or []:
        if pos >= end or stopped:
            break
        teacher_id = vocab.one(token["bytes"])
        if teacher_id is None and vocab.special.get(bytes(token["bytes"])) == sample.token_ids[pos]:
            teacher_id = sample.token_ids[pos]  # the turn's end-of-turn token, where the student's turn ends too
        if teacher_id is None or teacher_id != sample.token_ids[pos]:
            cov.uncovered["unmapped_token" if teacher_id is None else "retokenized"] += end - pos
            pos, stopped = end, True
            break
        alternatives = [(vocab.alternative(raw), float(lp)) for raw, lp in token["top"][:k]]
        alt_ids = [i for i, _ in alternatives]
        if not alternatives or None in alt_ids or len(set(alt_ids)) != len(alt_ids):
            cov.uncovered["unmapped_alternative"] += 1
        else:
            sample.teacher_topk_ids[pos] = [int(i) for i in alt_ids if i is not None] + [-1] * (k - len(alt_ids))
            sample.teacher_topk_logprobs[pos] = [lp for _, lp in alternatives] + [0.0] * (k - len(alt_ids))
            cov.covered += 1
            cov.mass += sum(math.exp(lp) for _, lp in alternatives)
        pos += 1
    if pos < end:
        cov.uncovered["not_scored"] += end - pos


def attach_soft_targets(trajectory: dict[str, Any], samples: list[TrainingSample], vocab: StudentVocab, k: int,
                        cov: Coverage) -> None:  # fmt: skip
    """Give every sample of one trajectory [T][k] top-k rows (all -1 where no soft targets), in place."""
    for sample in samples:
        sample.teacher_topk_ids = [[-1] * k for _ in sample.token_ids]
        sample.teacher_topk_logprobs = [[0.0] * k for _ in sample.token_ids]
    turns = [step.get("teacher_logprobs") for step in trajectory.get("steps") or []]
    runs = [(sample, start, end) for sample in samples for start, end in _runs(sample.loss_mask)]
    cov.total += sum(end - start for _, start, end in runs)
    if len(runs) != len(turns):  # a turn rendered as several runs (or none): no safe pairing, plain NLL
        cov.uncovered["unpaired_turns"] += sum(end - start for _, start, end in runs)
        return
    for (sample, start, end), turn in zip(runs, turns, strict=True):
        _fill_turn(sample, start, end, turn, vocab, k, cov)


def render_with_soft_targets(trajectories: list[dict[str, Any]], tokenizer: Any, vocab: StudentVocab, k: int,
                             **render_kwargs: Any) -> tuple[list[TrainingSample], RenderStats, Coverage]:  # fmt: skip
    """`render_many`, one trajectory at a time so each sample knows its teacher turns, plus soft targets."""
    stats, cov = RenderStats(), Coverage()
    samples: list[TrainingSample] = []
    for trajectory in trajectories:
        out, one = render_many([trajectory], tokenizer, **render_kwargs)
        stats.merge(one)
        attach_soft_targets(trajectory, out, vocab, k, cov)
        samples.extend(out)
    return samples, stats, cov


async def probe_top_logprobs(client: ChatClient, vocab: StudentVocab, k: int, where: str) -> None:
    """At startup: one short request (cached in OUTPUT/teacher_cache like any answer) must return k alternatives
    per token whose bytes map onto the student's vocabulary; otherwise a UsageError naming the fix."""
    key = "orchestrator.sampling.top_logprobs"
    try:
        response = await client.chat(PROBE_MESSAGES, key=PROBE_KEY)
    except ClientError as e:
        raise UsageError(f"{key} = {k}: the teacher ({where}) failed a one-request probe at startup: {e}. Lower "
                         f"{key} (OpenAI allows at most 20) or set it to 0 for plain SFT targets.") from None  # fmt: skip
    tokens = response.token_logprobs or []
    if not tokens:
        raise UsageError(f"{key} = {k}: the teacher ({where}) returned no logprobs when probed at startup, so there "
                         f"are no soft targets to train on. Use an endpoint that returns logprobs, or set {key} = 0.")  # fmt: skip
    widest = max(len(t["top"]) for t in tokens)
    if widest < k:
        raise UsageError(f"{key} = {k}, but the teacher ({where}) returned at most {widest} alternatives per token "
                         f"when probed at startup: set {key} = {widest} or less.")  # fmt: skip
    mapped = sum(vocab.one(t["bytes"]) is not None for t in tokens)
    if mapped == 0:
        raise UsageError(
            f"{key} = {k}: none of the {len(tokens)} tokens the teacher ({where}) returned at startup is a token of "
            f"the student's vocabulary (model.name), so no position could get soft targets: the two tokenizers "
            f"differ. Use a teacher with the student's tokenizer (same model family), or set {key} = 0 and "
            f'trainer.loss.type = "sft" (plain SFT on the teacher\'s text works with any tokenizer).'
        )
