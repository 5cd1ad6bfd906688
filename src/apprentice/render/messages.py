"""Message path: rebuild training samples from chat messages with the student's chat template and tokenizer.

Worked example (ChatML, one tool round then a new user question):

    turn 0: P0 = "<sys><user>assistant\\n"            F0 = P0 + "call<|im_end|>" + "\\n"
    turn 1: P1 = F0 + "<tool>assistant\\n"            F1 = P1 + "done<|im_end|>" + "\\n"
    turn 2: P2 = F1 + "<user>assistant\\n"            F2 = P2 + "ok<|im_end|>" + "\\n"

Each Pk starts with the previous turn's text up to its end-of-turn, so all three merge into one sample whose
ids are tokenize(F2), with the loss mask True on "call<|im_end|>", "done<|im_end|>" and "ok<|im_end|>" only.
Were P2 to rewrite turn 1 (a reasoning template dropping old <think> blocks), turn 2 would start a new sample
and turns 0-1 would be trained as rendered when they were generated.

Cost: two renders per assistant turn (its prompt and itself) on messages prepared once, one tokenization per
sample, and short tokenizations to verify each span boundary (align.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from apprentice.render.align import TokenizedText
from apprentice.render.errors import RenderError
from apprentice.render.reasoning import Reasoning, apply_reasoning, template_reads_reasoning
from apprentice.render.template import ChatRenderer, check_turn_rendered, end_of_turn_markers, find_end_of_turn
from apprentice.types import TrainingSample

Message = dict[str, Any]


@dataclass
class Turn:
    """One assistant turn: its prompt text, its full text, and its generated span [start, end) in both."""

    where: str
    messages: list[Message]  # the conversation up to and including this turn (reasoning policy applied)
    prompt: str
    full: str
    start: int
    end: int


def conversation_turns(steps: list[dict[str, Any]], renderer: ChatRenderer, reasoning: Reasoning) -> list[Turn]:
    """Render every assistant turn of every step; raises RenderError where a turn cannot be rendered faithfully."""
    markers = end_of_turn_markers(renderer.tokenizer)
    reads = template_reads_reasoning(renderer.tokenizer.get_chat_template(None, renderer.tools))
    turns: list[Turn] = []
    raw_prev: list[Message] = []
    msgs_prev: list[Message] = []
    prepared_prev: list[Any] = []
    for s, step in enumerate(steps):
        completion = list(step.get("completion") or [])
        if not completion:
            raise RenderError("no_turns", f"step {s} has no completion messages")
        raw = list(step.get("prompt") or []) + completion
        # Steps usually repeat the previous conversation as their prompt: prepare only what is new.
        same = 0
        limit = min(len(raw), len(raw_prev))
        while same < limit and (raw[same] is raw_prev[same] or raw[same] == raw_prev[same]):
            same += 1
        msgs = msgs_prev[:same] + [apply_reasoning(m, reasoning, reads) for m in raw[same:]]
        prepared = prepared_prev[:same] + [renderer.prepare(m) for m in msgs[same:]]
        raw_prev, msgs_prev, prepared_prev = raw, msgs, prepared
        first = len(raw) - len(completion)
        for j in range(first, len(raw)):
            where = f"step {s} completion message {j - first}"
            role = raw[j].get("role")
            if role != "assistant":
                raise RenderError("not_assistant", f"{where} has role {role!r}; completions must be assistant turns")
            turns.append(_render_turn(renderer, msgs[: j + 1], prepared[: j + 1], markers, reads, where))
    if not turns:
        raise RenderError("no_turns", "the trajectory has no steps")
    return turns


def _render_turn(
    renderer: ChatRenderer,
    msgs: list[Message],
    prepared: list[Any],
    markers: tuple[str, ...],
    reads: bool,
    where: str,
) -> Turn:
    prompt = renderer.render(prepared[:-1], add_generation_prompt=True, where=where)
    full = renderer.render(prepared, add_generation_prompt=False, where=where)
    if not full.startswith(prompt):
        raise RenderError(
            "prefix_mismatch",
            f"{where}: the template's rendering of the turn does not extend its own generation prompt "
            f"(prompt ends {prompt[-40:]!r}, turn text there is {full[max(0, len(prompt) - 40) : len(prompt)]!r})",
        )
    found = find_end_of_turn(full, len(prompt), markers)
    if found is None:
        raise RenderError("no_end_of_turn", f"{where}: no end-of-turn token (one of {markers}) in the rendered turn")
    end, marker = found
    if marker in full[len(prompt) : end - len(marker)]:
        raise RenderError(
            "special_in_content",
            f"{where}: the generated text contains the end-of-turn token {marker!r}; the student would stop there",
        )
    check_turn_rendered(msgs[-1], full[len(prompt) : end], reads, where)
    return Turn(where, msgs, prompt, full, len(prompt), end)


def group_turns(turns: list[Turn]) -> list[list[Turn]]:
    """Consecutive turns merge while each prompt starts with the previous turn's text up to its end-of-turn."""
    groups: list[list[Turn]] = []
    for turn in turns:
        if groups and turn.prompt.startswith(groups[-1][-1].full[: groups[-1][-1].end]):
            groups[-1].append(turn)
        else:
            groups.append([turn])
    return groups


def sample_from_group(group: list[Turn], renderer: ChatRenderer) -> TrainingSample:
    """Tokenize the group's last text once; mask exactly each turn's generated tokens (prefix ids verified)."""
    last = group[-1]
    renderer.check(last.messages, last.full, last.where)
    tokenized = TokenizedText(renderer.tokenizer, last.full)
    mask = [False] * len(tokenized.ids)
    for turn in group:
        lo = tokenized.boundary(turn.start, f"{turn.where} (start of generated text)")
        hi = tokenized.boundary(turn.end, f"{turn.where} (end of turn)")
        if hi <= lo:
            raise RenderError("empty_mask", f"{turn.where}: the generated text covers no token")
        mask[lo:hi] = [True] * (hi - lo)
    return TrainingSample(token_ids=tokenized.ids, loss_mask=mask, logprobs=[0.0] * len(mask), advantage=1.0)


def render_messages(
    steps: list[dict[str, Any]],
    tokenizer: Any,
    tools: list[dict] | None,
    reasoning: Reasoning = "keep",
    template_kwargs: dict[str, Any] | None = None,
) -> list[TrainingSample]:
    renderer = ChatRenderer(tokenizer, tools, template_kwargs)
    groups = group_turns(conversation_turns(steps, renderer, reasoning))
    return [sample_from_group(group, renderer) for group in groups]
