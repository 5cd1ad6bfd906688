"""The slow, obviously-correct tokenization: tokenize every prompt and every prompt + completion in full.

The texts (each turn's inference prompt and completion) come from messages.py; this module rebuilds the ids
the naive way, as a student at inference would see them: a turn's prompt ids are tok(P) in full, its generated
ids are what tok(P + C) adds after tok(P) (or, where a token straddles the boundary, C tokenized on its own
after the prompt's last added token), and a turn joins the current sample when tok(P) starts with the sample's
ids. The property tests use it as the oracle of the fast path; bench/render.py times it as the naive cost.
"""

from __future__ import annotations

from typing import Any

from apprentice.render.align import Tokens
from apprentice.render.errors import RenderError
from apprentice.render.messages import TurnRenderer, conversation_turns
from apprentice.render.normalize import ToolCallArguments
from apprentice.render.reasoning import Reasoning
from apprentice.render.template import ChatRenderer
from apprentice.types import TrainingSample


def render_reference(
    trajectory: dict[str, Any],
    tokenizer: Any,
    *,
    tools: list[dict] | None = None,
    reasoning: Reasoning = "keep",
    template_kwargs: dict[str, Any] | None = None,
    allow_control_tokens: bool = False,
    tool_call_arguments: ToolCallArguments = "dict",
) -> list[TrainingSample]:
    """Same contract and errors as the message path of `render_trajectory`, at O(turns) full tokenizations."""
    tools = tools if tools is not None else trajectory.get("tools")
    renderer = ChatRenderer(tokenizer, tools, template_kwargs, tool_call_arguments)
    turns = conversation_turns(
        list(trajectory.get("steps") or []),
        TurnRenderer(renderer, reasoning, allow_control_tokens),
        bool(trajectory.get("truncated")),
    )
    tokens = Tokens(tokenizer)
    samples: list[TrainingSample] = []
    ids: list[int] = []
    mask: list[bool] = []
    for turn in turns:
        prompt = tokens.encode(turn.prompt)
        if not (ids and prompt[: len(ids)] == ids):
            if ids:
                samples.append(TrainingSample(ids, mask, [0.0] * len(ids), 1.0))
            ids, mask = [], []
        mask += [False] * (len(prompt) - len(ids))
        ids = list(prompt)
        whole = tokens.encode(turn.prompt + turn.completion)
        if whole[: len(prompt)] == prompt:
            gen = whole[len(prompt) :]
        else:
            anchor = tokens.last_added(turn.prompt)
            if anchor is None:
                raise RenderError("boundary", f"{turn.where}: no added token in the prompt")
            gen = tokens.after(turn.prompt[anchor[0] : anchor[1]], turn.completion)
        ids += gen
        mask += [True] * len(gen)
        if turn.truncated or whole[: len(prompt)] != prompt:
            # Nothing can extend a cut-off turn or a straddled boundary: inference re-tokenizes the next prompt.
            samples.append(TrainingSample(ids, mask, [0.0] * len(ids), 1.0))
            ids, mask = [], []
    if ids:
        samples.append(TrainingSample(ids, mask, [0.0] * len(ids), 1.0))
    return samples
