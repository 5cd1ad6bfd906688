"""The slow, obviously-correct renderer: render and tokenize every prefix with transformers' own pipeline.

This is the definition the fast message path (messages.py) must reproduce, token for token. It is used by the
property tests as the oracle and by bench/render.py as the naive cost (about 100x one render + tokenization
for a 200-turn conversation). Merging is decided on ids: a turn joins the current sample when its prompt ids
start with the sample's ids up to the previous end-of-turn token.
"""

from __future__ import annotations

from typing import Any

from apprentice.render.errors import RenderError
from apprentice.render.reasoning import Reasoning, apply_reasoning, template_reads_reasoning
from apprentice.render.template import TEMPLATE_ERRORS, check_turn_rendered, end_of_turn_markers
from apprentice.types import TrainingSample

Message = dict[str, Any]


def render_reference(
    trajectory: dict[str, Any],
    tokenizer: Any,
    *,
    tools: list[dict] | None = None,
    reasoning: Reasoning = "keep",
    template_kwargs: dict[str, Any] | None = None,
) -> list[TrainingSample]:
    """Same contract and errors as the message path of `render_trajectory`, at O(turns) renders + tokenizations."""
    tools = tools if tools is not None else trajectory.get("tools")
    kwargs = dict(template_kwargs or {})
    reads = template_reads_reasoning(tokenizer.get_chat_template(None, tools))
    eot_ids = {tokenizer.convert_tokens_to_ids(m) for m in end_of_turn_markers(tokenizer)}

    def encode(messages: list[Message], generation: bool, where: str) -> tuple[str, list[int]]:
        try:
            text = tokenizer.apply_chat_template(
                messages, tools=tools, add_generation_prompt=generation, tokenize=False, **kwargs
            )
        except TEMPLATE_ERRORS as err:
            raise RenderError("template_error", f"{where}: the chat template failed: {err}") from err
        return text, list(tokenizer(text, add_special_tokens=False)["input_ids"])

    samples: list[TrainingSample] = []
    ids: list[int] = []  # current sample: ids of its last turn's full text
    mask: list[bool] = []
    generated_end = 0  # ids[:generated_end] ends with the last turn's end-of-turn token
    steps = trajectory.get("steps") or []
    if not steps:
        raise RenderError("no_turns", "the trajectory has no steps")
    for s, step in enumerate(steps):
        completion = list(step.get("completion") or [])
        if not completion:
            raise RenderError("no_turns", f"step {s} has no completion messages")
        conv = [apply_reasoning(m, reasoning, reads) for m in list(step.get("prompt") or []) + completion]
        first = len(conv) - len(completion)
        for j in range(first, len(conv)):
            where = f"step {s} completion message {j - first}"
            if conv[j].get("role") != "assistant":
                raise RenderError("not_assistant", f"{where} has role {conv[j].get('role')!r}")
            prompt_text, prompt_ids = encode(conv[:j], True, where)
            full_text, full_ids = encode(conv[: j + 1], False, where)
            if not full_text.startswith(prompt_text):
                raise RenderError("prefix_mismatch", f"{where}: the turn does not extend its prompt")
            if full_ids[: len(prompt_ids)] != prompt_ids:
                raise RenderError("boundary", f"{where}: the prompt's ids are not a prefix of the turn's ids")
            eots = [i for i in range(len(prompt_ids), len(full_ids)) if full_ids[i] in eot_ids]
            if not eots:
                raise RenderError("no_end_of_turn", f"{where}: no end-of-turn token")
            end = eots[-1] + 1
            if any(full_ids[i] == full_ids[end - 1] for i in eots[:-1]):
                raise RenderError("special_in_content", f"{where}: end-of-turn token inside the generated text")
            check_turn_rendered(conv[j], tokenizer.decode(full_ids[len(prompt_ids) : end]), reads, where)
            if ids and prompt_ids[:generated_end] == ids[:generated_end]:
                keep = mask[:generated_end]
            else:
                if ids:
                    samples.append(TrainingSample(ids, mask, [0.0] * len(ids), 1.0))
                keep = []
            n_prompt = len(prompt_ids)
            mask = keep + [False] * (n_prompt - len(keep)) + [True] * (end - n_prompt) + [False] * (len(full_ids) - end)
            ids, generated_end = full_ids, end
    samples.append(TrainingSample(ids, mask, [0.0] * len(ids), 1.0))
    return samples
