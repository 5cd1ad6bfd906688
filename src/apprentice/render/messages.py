"""Message path: rebuild training samples from chat messages with the student's chat template and tokenizer.

The principle: in every sample, the tokens before a trained turn are exactly the student's inference prompt
for that turn (the template over the turn's prompt messages with add_generation_prompt=True, tokenized), and
the trained tokens are the turn as the student generates it, through the first end-of-turn token it emits.
Consecutive turns share a sample only where the next prompt's tokens extend it. Tokenizing the whole
conversation at once is not the reference: where it differs (a token straddling the header and a reply that
starts with whitespace), inference never saw that token.

Messages reach the template as the student's serving engine hands them over (normalize.py): by default as vLLM
does, tool-call arguments parsed into objects and a missing content as "".

Algorithm, per assistant turn (messages normalised once: normalize.py; reasoning policy: reasoning.py):

1. P = template(prompt, add_generation_prompt=True); F = template(prompt + [turn]). One render each.
2. The turn's text as generated, `body` (P + body is what the student's context holds after its turn):
   a. F starts with P (ChatML, Llama 3, Gemma, Phi, gpt-oss, Qwen3 with thinking on): body = F[len(P):].
   b. Otherwise find the generation prompt G = P - template(prompt) and split it into a header H and a
      trailing think part X (`<think>\\n`, or an empty block `<think>\\n\\n</think>\\n\\n`). Locate H in F: right
      after template(prompt) when F extends it; else (the template rewrites history once the turn is appended,
      e.g. Mistral folds the system prompt into the *last* user message) at the point where F stops agreeing
      with the same conversation ending in a dummy answer. body_raw = F after H.
      - body_raw starts with X: body = body_raw[len(X):].
      - X opens a think block the turn's rendering lacks (R1-distill and QwQ strip reasoning from every
        assistant message): body = reasoning + "\\n</think>\\n\\n" + answer, with the kept reasoning (empty when
        dropped or absent: the canonical empty block, never a reasoning the teacher did not write).
      - X is an empty thought block: body = body_raw when the turn has no kept reasoning; with reasoning the
        template cannot hold it where the student would generate it: set aside (template_dropped).
      - anything else: prefix_mismatch.
3. End of turn: the first stop marker in body (template.stop_markers: eos, generation_config eos, the token the
   template writes after an answer, and the one that closes a conversation ending in a tool call: gpt-oss's
   `<|call|>`, Gemma 4's `<|tool_response>`), skipping markers the teacher wrote when the user allows
   control tokens. Everything after it (Phi's "\\n<|endoftext|>", ChatML's "\\n") is template text the model
   never generates. completion C = body through that marker.
4. Cut-off turns (the trajectory's last turn when `truncated`, or a step with finish_reason "length") are trained
   without the marker; if nothing but reasoning remains, only the reasoning as written (no `</think>` the
   teacher never produced). A turn with no answer, no tool call and no kept reasoning is set aside
   (`empty_turn`): it would train a bare end-of-turn token.
5. Checks: the template rendered the answer, every tool call (counted by name) and the kept reasoning
   (else `template_dropped`); teacher text holds no control token (control.py).
6. Tokens (align.py): a sample starts with tok(P); each turn adds gen(C); a later turn joins when its P
   extends the sample's text and every boundary so far tokenized cleanly, adding tok(eot + E)[1:] for the
   env text E. The last prompt of every merged sample is re-tokenized once as a check.

Cost: two renders per turn on messages prepared once (plus a third only on templates that rewrite history),
short tokenizations per turn, and one full tokenization per sample (plus one check for merged samples).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from apprentice.render.align import Tokens
from apprentice.render.control import check_control_tokens
from apprentice.render.errors import RenderError
from apprentice.render.normalize import ToolCallArguments, normalize_message
from apprentice.render.reasoning import (
    CLOSE,
    OPEN,
    Reasoning,
    apply_reasoning,
    reasoning_of,
    split_think,
    template_reads_reasoning,
)
from apprentice.render.template import ChatRenderer, FastPathBroken, first_stop, stop_markers
from apprentice.types import TrainingSample

Message = dict[str, Any]
# A generation prompt's trailing thought block: opened (the model reasons next) or closed empty (thinking off).
# `<think>` (Qwen3, R1, QwQ, SmolLM3) and Gemma 4's thought channel.
_THINK_TAIL = re.compile(r"(?:<think>\s*(?P<close></think>\s*)?|<\|channel>thought\s*(?P<close2><channel\|>\s*)?)$")
_DUMMY = "\u2063dummy\u2063"


@dataclass
class Turn:
    """One assistant turn: its inference prompt text and its completion text (as the model generates it)."""

    where: str
    prompt: str
    completion: str
    truncated: bool
    messages: list[Message]  # prepared prefix through this turn (for the fast-path check)


def _lcp(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class TurnRenderer:
    """Renders assistant turns of one trajectory into (prompt, completion) texts."""

    def __init__(self, renderer: ChatRenderer, reasoning: Reasoning, allow_control: bool) -> None:
        self.r = renderer
        self.reasoning = reasoning
        self.allow_control = allow_control
        self.reads = template_reads_reasoning(renderer.template)
        self.markers = stop_markers(renderer)
        self.traits = renderer.traits()

    def prepare(self, raw: Message, where: str, trained: bool) -> tuple[Message, Any]:
        """(normalised message, prepared for the template); the reasoning policy applies to trained turns only:
        history is rendered as the prompt messages say, which is what the student's server renders."""
        msg = apply_reasoning(raw, self.reasoning, self.reads) if trained else raw
        msg = normalize_message(msg, self.traits, where, trained=trained)
        return msg, self.r.prepare(msg)

    def body(self, prepared: list[Any], msg: Message, where: str) -> tuple[str, str]:
        """(P, body) of the turn prepared[-1]; see steps 1-2 of the module docstring."""
        prompt = self.r.render(prepared[:-1], True, where)
        full = self.r.render(prepared, False, where)
        if full.startswith(prompt):
            return prompt, full[len(prompt) :]
        base = self.r.render(prepared[:-1], False, where)
        if not prompt.startswith(base):
            raise RenderError("prefix_mismatch", f"{where}: the generation prompt does not extend the prompt")
        gen = prompt[len(base) :]
        think = _THINK_TAIL.search(gen)
        head, extra = (gen[: think.start()], gen[think.start() :]) if think else (gen, "")
        if full.startswith(base + head):
            at = len(base) + len(head)
        else:
            dummy = self.r.prepare({"role": "assistant", "content": _DUMMY})
            split = _lcp(full, self.r.render([*prepared[:-1], dummy], False, where))
            found = full.rfind(head, 0, split) if head else split
            if found < 0:
                raise RenderError(
                    "prefix_mismatch", f"{where}: the turn's rendering does not contain its generation prompt"
                )
            at = found + len(head)
        raw = full[at:]
        if raw.startswith(extra):
            return prompt, raw[len(extra) :]
        thought = reasoning_of(msg) if self.reasoning == "keep" else None
        thought = thought.strip("\n") if thought and thought.strip() else ""
        closed = think is not None and bool(think.group("close") or think.group("close2"))
        if not closed and not extra.startswith(OPEN):
            raise RenderError("prefix_mismatch", f"{where}: the generation prompt opens a block {extra!r} the turn lacks")
        if not closed:  # an opened <think>: the model writes reasoning, closes it, answers
            head_raw = raw.lstrip()
            if head_raw.startswith(OPEN) and CLOSE in head_raw:  # the teacher's own block, kept by the template
                return prompt, head_raw[len(OPEN) :].lstrip("\n")
            return prompt, f"{thought}\n{CLOSE}\n\n" + split_think(raw)[1].lstrip("\n")
        if thought:
            raise RenderError(
                "template_dropped",
                f"{where}: the generation prompt closes the thought block ({extra!r}), so the turn's reasoning "
                "has no place where the student would generate it (use reasoning = \"drop\" or enable thinking)",
            )
        return prompt, raw.lstrip(" \n") if extra.endswith(("\n", " ")) else raw

    def turn(self, prepared: list[Any], msg: Message, truncated: bool, where: str) -> Turn:
        found = check_control_tokens(self.r.tokenizer, msg, self.allow_control, where)
        skip = sum(token in self.markers for token in found)  # allowed end-of-turn tokens the teacher wrote
        prompt, body = self.body(prepared, msg, where)
        stop = first_stop(body, 0, self.markers, skip=skip)
        if stop is None:
            raise RenderError(
                "no_end_of_turn", f"{where}: no end-of-turn token (one of {self.markers}) in the rendered turn"
            )
        completion = body[: stop[1]]
        content = msg.get("content")
        answer = split_think(content)[1] if isinstance(content, str) else ""
        thought = reasoning_of(msg)
        has_calls = bool(msg.get("tool_calls"))
        check_rendered(msg, completion, thought, where)
        if truncated:
            completion = body[: stop[0]]
            if not answer.strip() and not has_calls:
                kept = thought.strip() if thought else ""
                at = completion.find(kept) if kept else -1
                if at < 0:
                    raise RenderError("empty_turn", f"{where}: the cut-off turn has no text to train on")
                completion = completion[: at + len(kept)]
        elif not answer.strip() and not has_calls and not (thought and thought.strip()):
            raise RenderError(
                "empty_turn", f"{where}: the turn has no answer, tool call or kept reasoning (a bare end-of-turn)"
            )
        if not completion:
            raise RenderError("empty_turn", f"{where}: the turn's generated text is empty")
        return Turn(where, prompt, completion, truncated, list(prepared))


def check_rendered(msg: Message, completion: str, thought: str | None, where: str) -> None:
    """RenderError("template_dropped") if the template left out the answer, a tool call or kept reasoning."""
    content = msg.get("content")
    if isinstance(content, str) and split_think(content)[1].strip() not in completion:
        raise RenderError("template_dropped", f"{where}: the chat template did not render the turn's content")
    # Count each call's name in what the template wrote besides the teacher's prose (a reasoning that says "use
    # the calculator" must not stand in for a dropped `calculator` call).
    rest = completion
    for piece in (split_think(content)[1] if isinstance(content, str) else "", thought or ""):
        if piece.strip():
            rest = rest.replace(piece.strip(), "", 1)
    names: dict[str, int] = {}
    for call in msg.get("tool_calls") or []:
        name = str((call.get("function") or call).get("name", ""))
        names[name] = names.get(name, 0) + 1
    for name, count in names.items():
        if rest.count(name) < count:
            raise RenderError(
                "template_dropped",
                f"{where}: the chat template rendered {rest.count(name)} of {count} tool call(s) {name!r}",
            )
    if thought and thought.strip() and thought.strip() not in completion:
        raise RenderError("template_dropped", f"{where}: reasoning = \"keep\" but the template did not render it")


def conversation_turns(
    steps: list[dict[str, Any]], turns: TurnRenderer, truncated: bool
) -> list[Turn]:
    """Every assistant turn of every step, in order; RenderError where one cannot be rendered faithfully."""
    if not steps:
        raise RenderError("no_turns", "the trajectory has no steps")
    out: list[Turn] = []
    raw_prev: list[Message] = []
    prepared_prev: list[Any] = []
    for s, step in enumerate(steps):
        completion = list(step.get("completion") or [])
        if not completion:
            raise RenderError("no_turns", f"step {s} has no completion messages")
        raw = list(step.get("prompt") or []) + completion
        same = 0  # steps usually repeat the previous conversation as their prompt: prepare only what is new
        limit = min(len(raw), len(raw_prev))
        while same < limit and (raw[same] is raw_prev[same] or raw[same] == raw_prev[same]):
            same += 1
        prepared = prepared_prev[:same]
        for j in range(same, len(raw)):
            prepared.append(turns.prepare(raw[j], f"step {s} message {j}", trained=False)[1])
        raw_prev, prepared_prev = raw, prepared
        first = len(raw) - len(completion)
        cut_step = step.get("finish_reason") == "length" or (truncated and s == len(steps) - 1)
        for j in range(first, len(raw)):
            where = f"step {s} completion message {j - first}"
            if raw[j].get("role") != "assistant":
                raise RenderError("not_assistant", f"{where} has role {raw[j].get('role')!r}; completions are assistant turns")
            msg, turn = turns.prepare(raw[j], where, trained=True)
            out.append(turns.turn([*prepared[:j], turn], msg, cut_step and j == len(raw) - 1, where))
    return out


def build_samples(turns: list[Turn], tokens: Tokens, renderer: ChatRenderer) -> list[TrainingSample]:
    """Token ids and masks of the samples (step 6 of the module docstring)."""
    samples: list[TrainingSample] = []
    ids: list[int] = []
    mask: list[bool] = []
    text = ""
    anchor = ""  # the end-of-turn token that ends `text`
    extendable = False
    last_prompt: tuple[Turn, int] | None = None  # the latest merged turn and its prompt length, to verify

    def close() -> None:
        if not ids:
            return
        if last_prompt is not None:
            turn, n = last_prompt
            renderer.check(turn.messages[:-1], turn.prompt, True, turn.where)
            if tokens.encode(turn.prompt) != ids[:n]:
                raise RenderError(
                    "boundary", f"{turn.where}: the prompt's ids rebuilt from its parts differ from its tokenization"
                )
        samples.append(TrainingSample(list(ids), list(mask), [0.0] * len(ids), 1.0))

    for turn in turns:
        if ids and extendable and turn.prompt.startswith(text):
            env = tokens.after(anchor, turn.prompt[len(text) :])
            ids += env
            mask += [False] * len(env)
            last_prompt = (turn, len(ids))
        else:
            close()
            ids = tokens.encode(turn.prompt)
            mask = [False] * len(ids)
            last_prompt = None
            renderer.check(turn.messages[:-1], turn.prompt, True, turn.where)
        gen, clean = tokens.continuation(turn.prompt, turn.completion)
        ids += gen
        mask += [True] * len(gen)
        text = turn.prompt + turn.completion
        ended = tokens.last_added(turn.completion)
        extendable = clean and not turn.truncated and ended is not None and ended[1] == len(turn.completion)
        anchor = turn.completion[ended[0] :] if ended else ""
    close()
    return samples


def render_messages(
    steps: list[dict[str, Any]],
    tokenizer: Any,
    tools: list[dict] | None,
    reasoning: Reasoning = "keep",
    template_kwargs: dict[str, Any] | None = None,
    *,
    truncated: bool = False,
    allow_control_tokens: bool = False,
    tool_call_arguments: ToolCallArguments = "dict",
) -> list[TrainingSample]:
    for _ in range(2):  # a second pass only if the fast path broke (it is then off for good)
        renderer = ChatRenderer(tokenizer, tools, template_kwargs, tool_call_arguments)
        try:
            turns = conversation_turns(steps, TurnRenderer(renderer, reasoning, allow_control_tokens), truncated)
            return build_samples(turns, Tokens(tokenizer), renderer)
        except FastPathBroken:
            continue
    raise AssertionError("unreachable: the slow path never raises FastPathBroken")
