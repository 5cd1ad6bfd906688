"""The teacher-side sequence from a server that tokenizes with the teacher's own template, so no local copy of the
teacher's tokenizer or chat template is needed. Two protocols, tried in this order by the startup probe (probe.py),
on the teacher's endpoint or on the server `[orchestrator.teacher_model] tokenizer` names by URL:

    vLLM's `POST /tokenize` (vllm_tokenize.py; `apprentice serve` answers it too): messages -> ids in one request
    llama.cpp's `POST /apply-template` then `POST /tokenize` with pieces (llamacpp_tokenize.py): two requests

Both give every token its exact bytes and say which tokens are control tokens (turn markers, the end of turn).
Per trained turn (the prompt's requests are shared by every sample of a group):

    prompt      the conversation up to the turn in the teacher's template, with its generation prompt, tokenized
    completion  the student's text tokenized as a continuation of the prompt (with the prompt's text around its
                last control token, as render/align.py's `Tokens.continuation` does locally; control tokens never
                parsed in the student's text), then the end-of-turn token

The end of turn is the first control token the template writes after an assistant reply in a probe conversation;
the template's control tokens found there are what a student text may not hold (`control_token`, as locally).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Protocol

from apprentice.clients.base import ClientError
from apprentice.clients.cache import SharedRequests
from apprentice.clients.session import EndpointSession
from apprentice.config import EndpointConfig, TeacherEndpointConfig
from apprentice.crosstok.align import AlignError
from apprentice.crosstok.teacher import TeacherSide, TeacherTurn
from apprentice.crosstok.token_bytes import TokenBytes

MARKER = "Xq7 reply"
"""The assistant reply of the probe conversation that finds the end-of-turn token."""


@dataclass(frozen=True)
class Pieces:
    """A tokenized text: [N] ids, each token's exact bytes, and whether it is a control token."""

    ids: list[int]
    pieces: list[bytes]
    control: list[bool]

    def last_control(self) -> int | None:
        return max((i for i, c in enumerate(self.control) if c), default=None)


def tokenizer_server(endpoint: TeacherEndpointConfig) -> EndpointConfig:
    """Where the teacher's template and tokens are asked for: the server `tokenizer` names by URL (asked without
    the teacher's API key or headers: they are the scoring endpoint's), else the teacher's endpoint itself."""
    url = endpoint.tokenizer_url
    if url is None:
        return endpoint
    return EndpointConfig(base_url=url, model=endpoint.model, timeout_s=endpoint.timeout_s,
                          max_retries=endpoint.max_retries, max_requests_per_s=endpoint.max_requests_per_s,
                          max_retry_after_s=endpoint.max_retry_after_s)  # fmt: skip


class RemoteTokenizer(Protocol):
    """The teacher's tokenizer and chat template over its server (one protocol)."""

    url: str
    protocol: str
    """"vllm" or "llama.cpp": named in logs and errors."""

    async def probe_ids(self, text: str) -> list[int]:
        """The ids of `text` with the tokenizer's own special tokens added (BOS); ClientError when the server does
        not speak this protocol usably. Called once, first: it fixes what later calls rely on."""
        ...

    async def chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> Pieces:
        """The conversation in the teacher's template with its generation prompt (ClientError "bad_request" when
        the template refuses it)."""
        ...

    async def closed_turn(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> Pieces:
        """The conversation whose last message (the assistant's) is written as a finished turn; the tokens up to
        its end of turn are what counts (a server may write more after it)."""
        ...

    async def continuation(self, prompt: Pieces, text: str) -> tuple[list[int], list[bytes]]:
        """The teacher's tokens of `text` as a continuation of `prompt`, with their bytes; specials never parsed."""
        ...

    def metrics(self, reset: bool = False) -> dict[str, float]:
        """Its requests' counters and latencies under `distill/tokenize/` (requests, retries, latency_s, ...)."""
        ...

    async def aclose(self) -> None: ...


def session_metrics(sessions: list[EndpointSession], reset: bool) -> dict[str, float]:
    """The counters of a tokenizer's sessions summed and their latencies pooled, `teacher/...` renamed
    `distill/...` (beside the scoring requests' `distill/*`); `requests` and `retries` always present."""
    counters: defaultdict[str, float] = defaultdict(float)
    latencies: list[float] = []
    for session in sessions:
        for name, value in session.counters.items():
            counters[name] += value
        latencies += session.latencies_s
        if reset:
            session.reset()
    prefix = sessions[0].prefix
    out = {name.replace("teacher/", "distill/", 1): value for name, value in counters.items()}
    for name in ("requests", "retries"):
        out.setdefault(f"{prefix}{name}".replace("teacher/", "distill/", 1), 0.0)
    if latencies:
        out[f"{prefix}latency_s".replace("teacher/", "distill/", 1)] = sum(latencies) / len(latencies)
        out[f"{prefix}latency_s_max".replace("teacher/", "distill/", 1)] = max(latencies)
    return out


async def find_controls(remote: RemoteTokenizer) -> tuple[tuple[int, bytes], list[str]]:
    """((the end-of-turn id, its bytes): the first control token after an assistant reply in the template; the
    control tokens' texts in that probe conversation)."""
    rendered = await remote.closed_turn([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": MARKER}], None)
    controls = sorted({p.decode("utf-8", "replace") for p, c in zip(rendered.pieces, rendered.control, strict=True) if c})
    seen, at = b"", None
    for i, piece in enumerate(rendered.pieces):  # the token that ends the marker, then the first control after it
        seen += piece
        if MARKER.encode() in seen:
            at = i + 1
            break
    if at is None:
        raise ClientError("malformed", f"{remote.url}: the rendered probe conversation does not hold its reply")
    for i in range(at, len(rendered.ids)):
        if rendered.control[i]:
            return (rendered.ids[i], rendered.pieces[i]), controls
    raise ClientError("malformed", f"{remote.url}: no end-of-turn token after the assistant's reply in the template")


class EndpointTeacherSide(TeacherSide):
    """TeacherSide whose teacher tokenizer and template are a server's (`teacher_turn`)."""

    def __init__(self, remote: RemoteTokenizer, student_tokenizer: Any, end_of_turn: tuple[int, bytes],
                 controls: list[str]) -> None:  # fmt: skip
        # The student's half of TeacherSide (student_text); the teacher's half is remote.
        self.remote = remote
        self.student_bytes = TokenBytes(student_tokenizer)
        self.student_special = {int(i) for i, t in student_tokenizer.added_tokens_decoder.items() if t.special}
        self.teacher_control = controls
        self.end_of_turn, self.end_of_turn_bytes = end_of_turn
        # The samples of a group share their prompt: one request for all, even scored concurrently; a failure is
        # not remembered (a later step asks again).
        self._prompts = SharedRequests(remember=4096)

    async def _prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> Pieces:
        key = json.dumps([messages, tools], sort_keys=True, ensure_ascii=False)
        try:
            return await self._prompts.run(key, lambda: self.remote.chat(messages, tools))
        except ClientError as e:
            if e.kind == "bad_request":  # the template refuses the conversation
                raise AlignError("teacher_template", f"the teacher's chat template refused the conversation: {e}") from None
            raise

    async def teacher_turn(self, prompt: list[dict[str, Any]], completion: list[dict[str, Any]],
                           tools: list[dict[str, Any]] | None, student_completion_ids: list[int]) -> TeacherTurn:  # fmt: skip
        text, ends_turn, scored = self.student_text(student_completion_ids)
        head = await self._prompt(prompt, tools)
        message = completion[-1] if completion else {}
        if message.get("tool_calls") or message.get("reasoning_content"):
            # Structured parts: comparable only when the teacher's template writes the student's text for them.
            # The whole conversation rendered by the server must extend the prompt's tokens with that text.
            try:
                full = await self.remote.closed_turn(prompt + completion, tools)
            except ClientError as e:
                if e.kind != "bad_request":
                    raise
                full = Pieces([], [], [])
            after = b"".join(full.pieces[len(head.ids) :])
            if full.ids[: len(head.ids)] != head.ids or not after.startswith(text.encode("utf-8")):
                raise AlignError("tool_call_text", "the teacher's template writes this tool call (or reasoning) "
                                                   "as other text than the student's")  # fmt: skip
        completion_ids, pieces = await self.remote.continuation(head, text) if text else ([], [])
        if ends_turn:
            completion_ids, pieces = completion_ids + [self.end_of_turn], pieces + [self.end_of_turn_bytes]
        return TeacherTurn(ids=head.ids + completion_ids, completion_start=len(head.ids), ends_turn=ends_turn,
                           student_scored=scored, completion_bytes=pieces)  # fmt: skip
