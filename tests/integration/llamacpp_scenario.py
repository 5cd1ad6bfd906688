"""The llama.cpp teacher-side calls that tests/fixtures/llamacpp/record.py records against a real llama-server and
tests/integration/test_llamacpp_replay.py replays: one scenario, so the recording holds exactly the requests the replay makes."""

from __future__ import annotations

from typing import Any

from apprentice.crosstok.endpoint import EndpointTeacherSide, find_controls
from apprentice.crosstok.llamacpp_tokenize import LlamaCppTokenizer
from apprentice.crosstok.teacher import TeacherTurn

CONVERSATIONS: dict[str, list[list[dict[str, Any]]]] = {
    "smollm2": [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "naïve café — 東京 🙂"}],
    ],
    # Phi-3's template has no system role (llama-server folds one into the user turn; the template itself drops
    # it): the second conversation is a user turn after an earlier exchange instead.
    "phi3": [
        [{"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " two  spaces"},
         {"role": "user", "content": "naïve café — 東京 🙂"}],
    ],
}
ANSWERS = ["dlrow olleh", "𝔘𝔫𝔦 🙂 東京", "\n\nleading newlines", "x = [i**2 for i in range(3)]\n\tdone", " leading space"]
PROBE = "naïve 🙂 𝔘"


async def scenario(remote: LlamaCppTokenizer, student: Any, name: str) -> dict[str, Any]:
    """Everything the teacher side asks of the server for recording `name`, in a fixed order; returns what it
    built."""
    out: dict[str, Any] = {"probe_ids": await remote.probe_ids(PROBE)}
    end_of_turn, controls = await find_controls(remote)
    out["end_of_turn"], out["controls"] = end_of_turn, controls
    side = EndpointTeacherSide(remote, student, end_of_turn, controls)
    turns: list[TeacherTurn] = []
    for messages in CONVERSATIONS[name]:
        for answer in ANSWERS:
            ids = student(answer, add_special_tokens=False)["input_ids"] + [student.convert_tokens_to_ids("<|im_end|>")]
            turns.append(await side.teacher_turn(messages, [{"role": "assistant", "content": answer}], None, ids))
    out["turns"] = turns
    out["unparsed"] = await remote.tokenize("a<|im_end|>b", add_special=False, parse_special=False)
    return out
