"""The one error type of the render package: a trajectory that cannot be turned into exact training tokens."""

from __future__ import annotations

# Every kind the package raises; `kind` doubles as a metric suffix (`render/set_aside/<kind>`).
KINDS = (
    "no_turns",  # the trajectory has no steps or a step has no completion
    "not_assistant",  # a completion message whose role is not "assistant"
    "template_error",  # the chat template raised while rendering (it refuses the conversation, e.g. parallel calls)
    "prefix_mismatch",  # the turn's rendering cannot be lined up with its own generation prompt
    "no_end_of_turn",  # the rendered turn has no end-of-turn token to learn to stop on
    "control_token",  # teacher text holds a special token of the student's tokenizer (allow_control_tokens=false)
    "invalid_arguments",  # a trained tool call's arguments are not a JSON object (vLLM would render `{}` instead)
    "template_dropped",  # the template did not render the turn's content, tool calls or (kept) reasoning
    "empty_turn",  # the trained text would be empty (no answer, no call, no kept reasoning): never a bare end token
    "boundary",  # the prompt's ids rebuilt from their parts differ from the prompt's own tokenization
    "bad_tokens",  # token path: malformed server token ids / logprobs
    "empty_mask",  # a sample would have no token to learn
)


class RenderError(ValueError):
    """A trajectory that cannot be rendered faithfully; the orchestrator counts it by `kind` and sets it aside."""

    def __init__(self, kind: str, message: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown RenderError kind {kind!r}; expected one of {KINDS}")
        super().__init__(f"[{kind}] {message}")
        self.kind = kind
        self.message = message
