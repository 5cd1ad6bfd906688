"""Teacher distributions as they enter: vLLM's prompt_logprobs with k entries (the sampled token outside the
top-k adds one), OpenAI chat top_logprobs with bytes, the logprob floor, and the map onto a student vocabulary
(real tokenizers: the tiny byte-level BPE and Llama 3's from the installed package)."""

from __future__ import annotations

import math
from typing import Any

import pytest
from render_helpers import family, llama3_bpe

from apprentice.clients.logprobs import MIN_TEACHER_LOGPROB, BadLogprob, parse_token_logprobs
from apprentice.clients.scoring import parse_prompt_logprobs, stored_scores_problem
from apprentice.orchestrator.soft_targets import Coverage, StudentVocab, attach_soft_targets
from apprentice.testing.tiny import build_tiny_tokenizer
from apprentice.tokenbytes import bytes_to_id, vocab_bytes
from apprentice.types import TrainingSample


def vllm_entry(prompt_id: int, prompt_lp: float, prompt_rank: int, top: list[tuple[int, float]]) -> dict[str, Any]:
    """One vLLM prompt_logprobs entry: the top-k (ranks 1..k) plus the prompt token (its own rank)."""
    entry = {str(t): {"logprob": lp, "rank": r + 1, "decoded_token": f"t{t}"} for r, (t, lp) in enumerate(top)}
    entry.setdefault(str(prompt_id), {"logprob": prompt_lp, "rank": prompt_rank, "decoded_token": f"t{prompt_id}"})
    return entry


def test_vllm_prompt_logprobs_with_a_sampled_token_outside_the_top_k() -> None:
    ids = [5, 7, 9]
    entries = [None,
               vllm_entry(7, -0.1, 1, [(7, -0.1), (8, -2.5)]),  # sampled token inside the top-2: 2 keys
               vllm_entry(9, -6.0, 14, [(3, -0.2), (4, -1.9)])]  # outside: a 3rd key with rank 14  # fmt: skip
    assert len(entries[2]) == 3  # type: ignore[arg-type]
    data = {"choices": [{"prompt_logprobs": entries}]}
    scores = parse_prompt_logprobs(data, ids, top_k=2)
    assert scores.logprobs == [None, -0.1, -6.0]
    assert scores.topk_ids == [[], [7, 8], [3, 4]] and scores.topk_logprobs == [[], [-0.1, -2.5], [-0.2, -1.9]]
    assert parse_prompt_logprobs(data, ids).topk_ids is None  # k = 0: the sampled token alone


@pytest.mark.parametrize(("bad", "kind"), [(-math.inf, "nonfinite_logprob"), (math.nan, "nonfinite_logprob"),
                                           (-1e30, "absurd_logprob"), (-9999.0, "absurd_logprob"), (0.5, "absurd_logprob")])  # fmt: skip
def test_logprobs_outside_the_floor_are_refused_on_entry_and_in_the_cache(bad: float, kind: str) -> None:
    for where in ("sampled", "alternative"):
        entry = vllm_entry(7, bad if where == "sampled" else -0.5, 3, [(1, -0.2), (2, bad if where == "alternative" else -0.9)])
        with pytest.raises(BadLogprob) as info:
            parse_prompt_logprobs({"choices": [{"prompt_logprobs": [None, entry]}]}, [5, 7], top_k=2)
        assert info.value.kind == kind
    assert parse_prompt_logprobs({"choices": [{"prompt_logprobs": [None, {"7": MIN_TEACHER_LOGPROB}]}]}, [5, 7]).logprobs[1] == -1000.0
    assert stored_scores_problem({"logprobs": [None, bad], "token_ids": None}) is not None
    assert stored_scores_problem({"logprobs": [None, -1.0], "token_ids": None, "topk_ids": [[], [1]], "topk_logprobs": [[], [bad]]})
    assert stored_scores_problem({"logprobs": [None, -1.0], "token_ids": None, "topk_ids": [[], [1]], "topk_logprobs": [[], [-1.0]]}) is None
    with pytest.raises(BadLogprob):
        parse_token_logprobs({"content": [{"token": "a", "logprob": bad, "bytes": [97], "top_logprobs": []}]})


def test_vocab_bytes_are_exact_including_tokens_that_hold_part_of_a_character() -> None:
    text = "naïve café — 東京 🙂 ꙮ tab\there"
    partial = 0
    for tokenizer in (build_tiny_tokenizer(), _fast(llama3_bpe())):
        table = vocab_bytes(tokenizer)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert b"".join(table[i] for i in ids).decode("utf-8") == text  # type: ignore[misc]
        partial += sum(not _is_utf8(table[i]) for i in ids)  # decode([id]) would give U+FFFD for these
        mapped = bytes_to_id(tokenizer)
        assert all(mapped[table[i]] == i for i in ids)  # type: ignore[index]
    assert partial > 0


def _is_utf8(raw: bytes | None) -> bool:
    try:
        (raw or b"").decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _fast(backend: Any) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=backend)


PROBS = [0.6, 0.25, 0.1]


def openai_logprobs(tokenizer: Any, text: str, k: int) -> list[dict[str, Any]]:
    """OpenAI-shaped `logprobs.content` for `text` in `tokenizer`'s tokens: each token with k alternatives (itself
    first with probability PROBS[0], then its neighbours in the vocabulary), parsed as the chat client parses it."""
    table = vocab_bytes(tokenizer)
    content = []
    for t in tokenizer(text, add_special_tokens=False)["input_ids"]:
        alts = [t] + [a for a in range(300, 300 + k) if a != t][: k - 1]
        content.append({"token": "x", "logprob": math.log(PROBS[0]), "bytes": list(table[t]),
                        "top_logprobs": [{"token": "x", "logprob": math.log(PROBS[j]), "bytes": list(table[a])}
                                         for j, a in enumerate(alts)]})  # fmt: skip
    parsed = parse_token_logprobs({"content": content})
    assert parsed is not None
    return parsed


def rendered_sample(tokenizer: Any, prompt: str, answer: str) -> tuple[dict[str, Any], TrainingSample]:
    from apprentice.render import render_trajectory

    trajectory = {"steps": [{"prompt": [{"role": "user", "content": prompt}],
                             "completion": [{"role": "assistant", "content": answer}]}], "tools": None}  # fmt: skip
    (sample,) = render_trajectory(trajectory, tokenizer)
    return trajectory, sample


def test_a_teacher_with_the_students_tokenizer_maps_every_scored_position() -> None:
    student = build_tiny_tokenizer()
    trajectory, sample = rendered_sample(student, "Reverse: hello", "olleh dlrow")
    trajectory["steps"][0]["teacher_logprobs"] = openai_logprobs(student, "olleh dlrow", k=3)
    cov = Coverage()
    attach_soft_targets(trajectory, [sample], StudentVocab(student), 3, cov)
    assert sample.teacher_topk_ids is not None and sample.teacher_topk_logprobs is not None
    trained = [i for i, m in enumerate(sample.loss_mask) if m]
    answer_ids = student("olleh dlrow", add_special_tokens=False)["input_ids"]
    for j, pos in enumerate(trained[: len(answer_ids)]):
        assert sample.teacher_topk_ids[pos][0] == sample.token_ids[pos] == answer_ids[j]
        assert sample.teacher_topk_logprobs[pos] == pytest.approx([math.log(p) for p in PROBS])
    assert all(row == [-1, -1, -1] for i, row in enumerate(sample.teacher_topk_ids) if not sample.loss_mask[i])
    # Everything but the end-of-turn token (the teacher's logprobs cover its text only) is covered.
    metrics = cov.metrics()
    assert cov.covered == len(answer_ids) and cov.total == len(trained)
    assert metrics["distill/topk/covered_fraction"] == pytest.approx(len(answer_ids) / len(trained))
    assert metrics["distill/topk/uncovered/not_scored"] == len(trained) - len(answer_ids)
    assert metrics["distill/topk_mass"] == pytest.approx(sum(PROBS))


def test_a_teacher_with_another_tokenizer_maps_only_where_tokens_agree() -> None:
    student = build_tiny_tokenizer()
    teacher = _fast(llama3_bpe())
    text = "東京 and naïve"  # Llama 3 has merged tokens ("東京", " naïve") the tiny vocabulary lacks
    trajectory, sample = rendered_sample(student, "Say it", text)
    trajectory["steps"][0]["teacher_logprobs"] = openai_logprobs(teacher, text, k=2)
    cov = Coverage()
    attach_soft_targets(trajectory, [sample], StudentVocab(student), 2, cov)
    metrics = cov.metrics()
    assert metrics["distill/topk/covered_fraction"] < 0.5
    assert metrics.get("distill/topk/uncovered/unmapped_token", 0) + metrics.get("distill/topk/uncovered/retokenized", 0) > 0
    assert sample.teacher_topk_ids is not None and all(len(row) == 2 for row in sample.teacher_topk_ids)


def test_the_end_of_turn_token_is_a_valid_alternative_and_matches_the_students_own_end_of_turn() -> None:
    student = build_tiny_tokenizer()
    table = vocab_bytes(student)
    ok = next(i for i in range(300, len(table)) if (raw := table[i]) and raw.isalpha()
              and student(raw.decode(), add_special_tokens=False)["input_ids"] == [i])  # a word that is one token
    trajectory, sample = rendered_sample(student, "Say it", table[ok].decode())  # type: ignore[union-attr]
    eot = list(b"<|im_end|>")
    trajectory["steps"][0]["teacher_logprobs"] = [
        {"bytes": list(table[ok]), "logprob": math.log(0.7), "top": [[list(table[ok]), math.log(0.7)], [eot, math.log(0.2)]]},  # type: ignore[arg-type]
        {"bytes": eot, "logprob": math.log(0.9), "top": [[eot, math.log(0.9)]]},
    ]
    cov = Coverage()
    attach_soft_targets(trajectory, [sample], StudentVocab(student), 2, cov)
    first = sample.loss_mask.index(True)
    assert sample.teacher_topk_ids is not None
    assert sample.teacher_topk_ids[first] == [ok, student.convert_tokens_to_ids("<|im_end|>")]
    # The teacher's stop token, where the student's turn ends too: the teacher's distribution there is a target.
    assert sample.token_ids[first + 1] == student.convert_tokens_to_ids("<|im_end|>")
    assert sample.teacher_topk_ids[first + 1] == [student.convert_tokens_to_ids("<|im_end|>"), -1]
    assert cov.covered == 2 and not cov.uncovered


def test_an_alternative_named_by_replacement_bytes_is_not_mapped_onto_the_students_literal_replacement_token() -> None:
    """vLLM names each top-k token by decoding it alone: a token holding part of a character (an emoji's first
    bytes) arrives as "\ufffd" with U+FFFD's bytes. Llama 3 (like SmolLM2) has a token of exactly those bytes
    (5809): the teacher's probability of the emoji start was trained onto the literal "\ufffd"."""
    student = family("llama3.2")  # the real Llama 3.2 tokenizer.json and chat template
    replacement = "\ufffd".encode()
    assert bytes_to_id(student)[replacement] == 5809
    trajectory, sample = rendered_sample(student, "Greet me", "Hello")
    content = openai_logprobs(student, "Hello", k=3)
    content[0]["top"][2][0] = list(replacement)  # what vLLM sends for the partial-character alternative
    trajectory["steps"][0]["teacher_logprobs"] = content
    cov = Coverage()
    attach_soft_targets(trajectory, [sample], StudentVocab(student), 3, cov)
    assert sample.teacher_topk_ids is not None
    assert all(5809 not in row for row in sample.teacher_topk_ids)
    assert cov.metrics()["distill/topk/uncovered/unmapped_alternative"] == 1
