"""The teacher-side sequence of a student turn (apprentice.crosstok.teacher), with real templates and tokenizers:
the teacher's own template and end of turn, the completion as the teacher's tokens of the same bytes, and the
turns that are refused with a kind."""

from __future__ import annotations

import pytest
from render_helpers import family

from apprentice.crosstok.align import AlignError
from apprentice.crosstok.teacher import TeacherSide, find_end_of_turn
from apprentice.testing.tiny import build_tiny_tokenizer
from apprentice.testing.tiny_sp import build_tiny_sp_tokenizer

PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi in French 🙂"}]


def test_end_of_turn_is_read_from_each_template() -> None:
    for name, eot in (("qwen2.5", "<|im_end|>"), ("llama3.2", "<|eot_id|>"), ("gemma2", "<end_of_turn>")):
        tok = family(name)
        assert find_end_of_turn(tok) == tok.convert_tokens_to_ids(eot), name
    sp = build_tiny_sp_tokenizer()
    assert find_end_of_turn(sp) == sp.convert_tokens_to_ids("<|end|>")


def test_a_turn_in_the_teachers_template_and_tokens() -> None:
    student, teacher = family("qwen2.5"), family("llama3.2")
    side = TeacherSide(teacher, student)
    answer = "Salut ! 👋  Ça va ?\n\tcode: x=1"
    ids = student(answer, add_special_tokens=False)["input_ids"] + [student.convert_tokens_to_ids("<|im_end|>")]
    turn = side.turn(PROMPT, [{"role": "assistant", "content": answer}], None, ids)
    prompt_text = teacher.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    assert turn.ids[: turn.completion_start] == teacher(prompt_text, add_special_tokens=False)["input_ids"]
    assert turn.ids[-1] == teacher.convert_tokens_to_ids("<|eot_id|>") and turn.ends_turn
    assert b"".join(side.teacher_bytes(turn.ids[turn.completion_start : -1])) == answer.encode()
    assert turn.student_scored == len(ids)


def test_a_cut_off_character_and_bytes_that_are_no_text() -> None:
    student, teacher = build_tiny_tokenizer(), build_tiny_sp_tokenizer()
    side = TeacherSide(teacher, student)
    ids = student("ok 🙂", add_special_tokens=False)["input_ids"]
    pieces = side.student_bytes(ids)
    assert len(pieces[-1]) < 4  # the tiny vocabulary writes the emoji in several tokens
    cut = ids[:-1]  # max_tokens stopped inside the emoji
    text, ends_turn, scored = side.student_text(cut)
    assert text == "ok " and not ends_turn and b"".join(pieces[:scored]) == b"ok "
    turn = side.turn(PROMPT, [{"role": "assistant", "content": "ok"}], None, cut)
    assert not turn.ends_turn and b"".join(side.teacher_bytes(turn.ids[turn.completion_start :])) == b"ok "
    with pytest.raises(AlignError) as info:  # an unfinished character followed by more text
        side.student_text(cut + student("fine", add_special_tokens=False)["input_ids"])
    assert info.value.kind == "invalid_utf8"
    with pytest.raises(AlignError) as info:  # the turn ended, so nothing may be unfinished
        side.student_text([*cut, student.convert_tokens_to_ids("<|im_end|>")])
    assert info.value.kind == "invalid_utf8"
