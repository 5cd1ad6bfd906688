"""Render as the serving engine renders: real templates, tool-call histories, messages shaped as vLLM shapes them.

The reference here never calls render's own code: each family's real chat template is rendered with
`tokenizer.apply_chat_template` over the messages as vLLM hands them to it (tool-call `arguments` parsed from
their JSON strings into objects: `_postprocess_messages` in vllm/entrypoints/chat_utils.py). For every trained
turn the student's inference prompt is that rendering with the generation prompt, and what it generates is the
template's rendering of the turn after it, through the family's end-of-turn token (listed below from the
models' own generation configs, not probed). Every sample render_trajectory returns must agree: its prompt
ids are the tokenized prompt, its masked text is that generation, nothing else is masked.

Conversations: tests/fixtures/conversations/tool_histories.json (compact arguments such as `{"forecast":true}`,
non-ASCII and emoji arguments, a tool round already in the prompt). Templates and tokenizers: render_helpers.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from render_helpers import family, masked_texts

from apprentice.render import RenderError, render_trajectory
from apprentice.types import TrainingSample

HISTORIES = Path(__file__).resolve().parents[1] / "fixtures" / "conversations" / "tool_histories.json"

# The tokens each model stops at: an answer's end and, where the template has its own, a tool-call turn's end
# (gpt-oss stops at <|call|> and Gemma 4 at <|tool_response>: the server runs the call and appends the result).
STOPS = {
    "gemma4": ("<turn|>", "<|tool_response>"),
    "gpt-oss": ("<|return|>", "<|call|>"),
    "qwen2.5": ("<|im_end|>",),
    "qwen3": ("<|im_end|>",),
    "llama3.1": ("<|eot_id|>",),
    "llama3.2": ("<|eot_id|>",),
    "mistral-nemo": ("</s>",),
    "hermes3-llama3.1": ("<|im_end|>",),
}
# What a generation prompt writes that the template's rendering of the finished turn lacks: Gemma 4 with thinking
# off opens and closes an empty thought channel, and the model answers after it.
PROMPT_ONLY = {"gemma4": "<|channel>thought\n<channel|>"}


def histories() -> list[dict[str, Any]]:
    return json.loads(HISTORIES.read_text())


def specials(tok: Any) -> list[str]:
    return [t.content for t in tok.added_tokens_decoder.values() if t.special]


def vllm_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages as vLLM's chat endpoint hands them to the template: tool-call arguments parsed into objects,
    a missing content as the empty string (text parts joined)."""
    out = copy.deepcopy(messages)
    for message in out:
        if message.get("content") is None:
            message["content"] = ""
        for call in message.get("tool_calls") or []:
            call["function"]["arguments"] = json.loads(call["function"]["arguments"] or "{}")
    return out


def trajectory_of(conversation: dict[str, Any]) -> dict[str, Any]:
    """One step per trained assistant message, its prompt the conversation before it."""
    messages = conversation["messages"]
    start = conversation.get("train_from", 0)
    steps = [
        {"prompt": messages[:i], "completion": [m]}
        for i, m in enumerate(messages)
        if m["role"] == "assistant" and i >= start
    ]
    return {"steps": steps, "tools": conversation["tools"]}


def expected_turns(name: str, conversation: dict[str, Any]) -> list[tuple[str, str]]:
    """(inference prompt, generated text) of every trained turn, from the template over vLLM-shaped messages."""
    tok = family(name)
    tools = conversation["tools"]
    shaped = vllm_messages(conversation["messages"])
    out = []
    for i, message in enumerate(shaped):
        if message["role"] != "assistant" or i < conversation.get("train_from", 0):
            continue
        prompt = tok.apply_chat_template(shaped[:i], tools=tools, add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template(shaped[: i + 1], tools=tools, tokenize=False)
        head = prompt.removesuffix(PROMPT_ONLY.get(name, "\0"))
        if full.startswith(head):
            body = full[len(head) :]
        else:  # the template rewrites history once the turn is appended (Mistral moves the system prompt, Hermes
            # ends a last tool message differently): the turn follows the prompt's own header, from its last special
            header = prompt[max(prompt.rfind(t) for t in specials(tok)) :]
            assert header in full, f"{name}: turn {i} does not follow its header {header!r}"
            body = full[full.rfind(header) + len(header) :]
        ends = [body.find(stop) + len(stop) for stop in STOPS[name] if stop in body]
        assert ends, f"{name}: turn {i} has no end-of-turn token in {body!r}"
        out.append((prompt, body[: min(ends)]))
    return out


def differences(name: str, samples: list[TrainingSample], turns: list[tuple[str, str]]) -> list[str]:
    """Where the samples differ from the engine's prompts and generations (an empty list: none)."""
    tok = family(name)
    stop_ids = {tok.convert_tokens_to_ids(stop) for stop in STOPS[name]}
    diffs: list[str] = []
    covered = [[False] * len(s.token_ids) for s in samples]
    s = 0
    for n, (prompt, generated) in enumerate(turns):
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        while s < len(samples) and samples[s].token_ids[: len(ids)] != ids:
            s += 1
        if s == len(samples):
            return [*diffs, f"turn {n}: no sample starts with its inference prompt {prompt[-80:]!r}"]
        sample = samples[s]
        end = len(ids)
        while end < len(sample.token_ids) and sample.loss_mask[end]:
            end += 1
        trained = tok.decode(sample.token_ids[len(ids) : end], clean_up_tokenization_spaces=False)
        if any(sample.loss_mask[: len(ids)][-1:]) or trained != generated:
            diffs.append(f"turn {n}: trained {trained!r}, the engine's model generates {generated!r}")
        elif sample.token_ids[end - 1] not in stop_ids:
            diffs.append(f"turn {n}: the trained turn does not end with one of {STOPS[name]}")
        covered[s][len(ids) : end] = [True] * (end - len(ids))
    for i, (sample, cov) in enumerate(zip(samples, covered, strict=True)):
        if sample.loss_mask != cov:
            diffs.append(f"sample {i}: tokens outside the turns are masked")
    return diffs


@pytest.mark.parametrize("name", sorted(STOPS))
def test_render_matches_the_engine_on_tool_histories(name: str) -> None:
    tok = family(name)
    for conversation in histories():
        samples = render_trajectory(trajectory_of(conversation), tok)
        assert differences(name, samples, expected_turns(name, conversation)) == [], conversation["name"]


def test_the_reference_sees_what_the_old_rendering_got_wrong() -> None:
    """The check above can fail: the strings a teacher wrote, handed over as strings, print differently."""
    conversation = histories()[0]
    for name, verbatim in (("qwen3", '"arguments": {"city":"Paris","forecast":true,"days":2}'),
                           ("hermes3-llama3.1", '"arguments": {"city":"Paris","forecast":true,"days":2}')):  # fmt: skip
        samples = render_trajectory(trajectory_of(conversation), family(name), tool_call_arguments="string")
        assert verbatim in masked_texts(family(name), samples[0])[0]  # llama.cpp's rendering: the string as written
        assert differences(name, samples, expected_turns(name, conversation))  # ... is not vLLM's


def test_tool_call_turns_end_with_the_templates_own_terminator() -> None:
    conversation = histories()[0]
    gemma = family("gemma4")
    texts = [t for s in render_trajectory(trajectory_of(conversation), gemma) for t in masked_texts(gemma, s)]
    # Gemma 4's native arguments (strings in <|"|>, bare numbers and booleans, keys sorted), then the stop token.
    assert texts[0] == '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:2,forecast:true}<tool_call|><|tool_response>'
    assert texts[1].startswith("<|tool_call>call:book_table{filters:{cuisine:[<|\"|>french<|\"|>,")
    assert texts[1].endswith("<tool_call|><|tool_response>")
    oss = family("gpt-oss")
    texts = [t for s in render_trajectory(trajectory_of(conversation), oss) for t in masked_texts(oss, s)]
    assert texts[0] == ' to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris", "forecast": true, "days": 2}<|call|>'


def test_parallel_calls_end_once_in_gemma4() -> None:
    """`<tool_call|>` closes each call, not the turn: two calls are one trained turn ending in <|tool_response>."""
    gemma = family("gemma4")
    calls = [
        {"id": f"wx{i}", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": c})}}
        for i, c in enumerate(("Oslo", "Zürich"))
    ]
    trajectory = {
        "steps": [{"prompt": [{"role": "user", "content": "Oslo and Zürich?"}], "completion": [{"role": "assistant", "content": None, "tool_calls": calls}]}],
        "tools": histories()[0]["tools"],
    }
    (sample,) = render_trajectory(trajectory, gemma)
    assert masked_texts(gemma, sample) == [
        '<|tool_call>call:get_weather{city:<|"|>Oslo<|"|>}<tool_call|><|tool_call>call:get_weather{city:<|"|>Zürich<|"|>}<tool_call|><|tool_response>'
    ]


def test_arguments_that_are_not_a_json_object() -> None:
    """vLLM renders such arguments as `{}`: a trained call is set aside, a call in history renders as vLLM's."""
    tok = family("qwen2.5")
    tools = histories()[0]["tools"]
    user = {"role": "user", "content": "Weather in Oslo?"}
    broken = {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"'}}]}
    with pytest.raises(RenderError) as err:
        render_trajectory({"steps": [{"prompt": [user], "completion": [broken]}], "tools": tools}, tok)
    assert err.value.kind == "invalid_arguments" and "step 0" in str(err.value)
    history = [user, broken, {"role": "tool", "tool_call_id": "c1", "content": "error: bad arguments"}]
    answer = {"role": "assistant", "content": "Sorry, the lookup failed."}
    (sample,) = render_trajectory({"steps": [{"prompt": history, "completion": [answer]}], "tools": tools}, tok)
    coerced = {**broken, "tool_calls": [{**broken["tool_calls"][0], "function": {"name": "get_weather", "arguments": ""}}]}
    prompt = tok.apply_chat_template(vllm_messages([user, coerced, history[2]]), tools=tools, add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert '"arguments": {}' in prompt and sample.token_ids[: len(ids)] == ids and not any(sample.loss_mask[: len(ids)])


def test_the_setting_reaches_the_render() -> None:
    from pydantic import ValidationError

    from apprentice.config.orchestrator import OrchestratorConfig
    from apprentice.render import render_many

    assert OrchestratorConfig().tool_call_arguments == "dict"
    with pytest.raises(ValidationError, match="tool_call_arguments"):
        OrchestratorConfig(tool_call_arguments="json")  # type: ignore[arg-type]
    conversation = histories()[0]
    tok = family("qwen3")
    texts = {}
    for setting in ("dict", "string"):
        samples, _ = render_many([trajectory_of(conversation)], tok, tool_call_arguments=setting)  # type: ignore[arg-type]
        texts[setting] = masked_texts(tok, samples[0])[0]
    assert '{"city": "Paris", "forecast": true, "days": 2}' in texts["dict"]
    assert '{"city":"Paris","forecast":true,"days":2}' in texts["string"]


def test_a_token_that_closes_each_call_is_not_the_end_of_the_turn() -> None:
    """A template whose call turn ends with the token that also closes each call (GLM-style): not a stop token."""
    from tokenizers import AddedToken

    from apprentice.render.template import ChatRenderer, stop_markers
    from apprentice.testing.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in ("<call>", "</call>", "<end>")])
    tok.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content or '' }}"
        "{% for c in m.tool_calls or [] %}<call>{{ c.function.name }} {{ c.function.arguments | tojson }}</call>{% endfor %}"
        "{% if not m.tool_calls %}<end>{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    markers = stop_markers(ChatRenderer(tok, None))
    assert "<end>" in markers and "</call>" not in markers
    gemma = family("gemma4")
    assert {"<turn|>", "<|tool_response>"} <= set(stop_markers(ChatRenderer(gemma, None))) and "<tool_call|>" not in stop_markers(ChatRenderer(gemma, None))


def test_string_setting_keeps_strings_for_templates_that_only_take_strings() -> None:
    """llama.cpp passes the string to a template that concatenates it (DeepSeek R1's original); vLLM's dict fails."""
    from apprentice.testing.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content or '' }}"
        "{% for c in m.tool_calls or [] %}{{ 'call ' + c.function.name + ' ' + c.function.arguments }}{% endfor %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    conversation = histories()[0]
    steps = trajectory_of(conversation)["steps"][:1]
    (sample,) = render_trajectory({"steps": steps}, tok, tool_call_arguments="string")
    assert masked_texts(tok, sample) == ['call get_weather {"city":"Paris","forecast":true,"days":2}<|im_end|>']
    with pytest.raises(RenderError) as err:
        render_trajectory({"steps": steps}, tok)
    assert err.value.kind == "template_error"
