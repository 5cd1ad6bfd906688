"""The teacher-side sequence from the teacher's own endpoint: vLLM's `POST /tokenize` (which `apprentice serve`
also answers), so no local copy of the teacher's tokenizer or chat template is needed.

Per trained turn, two requests (the prompt's is reused by every sample of a group sharing it):

    {"model": M, "messages": [...], "tools": [...], "add_generation_prompt": true, "return_token_strs": true}
        -> the prompt's ids, in the teacher's template, with its generation prompt
    {"model": M, "prompt": tail + text, "add_special_tokens": false, "return_token_strs": true}
        -> the completion's ids as a continuation of the prompt (`tail`: the prompt from its last control token
           on, as render/align.py's `Tokens.continuation` does locally), and each token's bytes

A token's bytes are read from its string in one of three conventions, fixed once at startup by which of them
writes a probe text back byte for byte: vLLM's `convert_ids_to_tokens` pieces, byte-level BPE ("Ġ" a space) or
SentencePiece-style ("▁" a space, "<0xF0>" a byte), and OpenAI's text pieces (`apprentice serve`: a token's
text, "bytes:\\xf0\\x9f" for part of a character). Control tokens (the end of turn, turn markers) are the
template's tokens written "<...>" or "[...]" around the probe conversation's text; a student text holding one
is set aside (`control_token`), as on the local path.

llama.cpp's `/apply-template` + `/tokenize` with pieces is not spoken yet: such a teacher needs
`[orchestrator.teacher_model] tokenizer`.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any, Literal

from apprentice import tokenbytes
from apprentice.clients.base import ClientError
from apprentice.clients.http import RawResponse
from apprentice.clients.session import EndpointSession, SetAside
from apprentice.config import EndpointConfig
from apprentice.crosstok.align import AlignError
from apprentice.crosstok.teacher import TeacherSide, TeacherTurn
from apprentice.crosstok.token_bytes import TokenBytes

Scheme = Literal["text", "byte_level", "metaspace"]
_TEXT_BYTES = re.compile(r"\\x([0-9a-fA-F]{2})")
_CONTROL = re.compile(r"^(<[^<>\s]{2,}>|\[[A-Z_/]{2,}\])$")
_MARKER = "Xq7 reply"


def piece_bytes(piece: str, scheme: Scheme) -> bytes:
    """The bytes a token string stands for, in `scheme` (module docstring)."""
    if scheme == "text":
        if piece.startswith("bytes:"):
            return bytes(int(h, 16) for h in _TEXT_BYTES.findall(piece))
        return piece.encode("utf-8")
    return tokenbytes.piece_bytes(piece, byte_level=scheme == "byte_level")


def _is_control(piece: str) -> bool:
    return bool(_CONTROL.match(piece)) and not tokenbytes.BYTE_FALLBACK.match(piece)


def tokenize_root(base_url: str) -> str:
    """vLLM serves /tokenize beside /v1, not under it."""
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


class EndpointTokenizer:
    """The teacher's tokenizer and template over its `POST /tokenize` (one session, bounded like the scorers)."""

    def __init__(self, endpoint: EndpointConfig, *, max_concurrency: int) -> None:
        self.endpoint = endpoint
        self.url = f"{tokenize_root(endpoint.base_url)}/tokenize"
        self._session = EndpointSession(endpoint, self.url, max_concurrency=max_concurrency,
                                        max_response_bytes=16 * 1024 * 1024, section="orchestrator.teacher_model",
                                        prefix="teacher/tokenize/")  # fmt: skip
        self.scheme: Scheme = "text"

    async def request(self, body: dict[str, Any]) -> tuple[list[int], list[str] | None]:
        """(ids, token strings or None); ClientError when it fails for good."""

        def read(raw: RawResponse, data: Any) -> tuple[list[int], list[str] | None]:
            tokens = data.get("tokens") if isinstance(data, dict) else None
            strs = data.get("token_strs") if isinstance(data, dict) else None
            if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
                raise ClientError("malformed", f"{self.url}: no 'tokens' list of ids in the answer")
            if strs is not None and (not isinstance(strs, list) or len(strs) != len(tokens)):
                raise ClientError("malformed", f"{self.url}: 'token_strs' does not match 'tokens'")
            return tokens, strs

        try:
            return await self._session.request({"model": self.endpoint.model, **body}, read)
        except SetAside as e:
            raise ClientError(e.kind, str(e)) from None

    async def text(self, text: str, *, special: bool) -> tuple[list[int], list[bytes]]:
        ids, strs = await self.request({"prompt": text, "add_special_tokens": special, "return_token_strs": True})
        if strs is None:
            raise ClientError("malformed", f"{self.url}: the answer has no token_strs (return_token_strs)")
        return ids, [piece_bytes(s, self.scheme) for s in strs]

    async def chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, *,
                   generation: bool) -> tuple[list[int], list[str]]:  # fmt: skip
        body: dict[str, Any] = {"messages": messages, "add_generation_prompt": generation, "return_token_strs": True}
        if tools:
            body["tools"] = tools
        ids, strs = await self.request(body)
        if strs is None:
            raise ClientError("malformed", f"{self.url}: the answer has no token_strs (return_token_strs)")
        return ids, strs

    async def detect_scheme(self, probe_text: str) -> Scheme:
        """The convention of the token strings: the one that writes `probe_text` back byte for byte."""
        _, strs = await self.request({"prompt": probe_text, "add_special_tokens": False, "return_token_strs": True})
        if strs is None:
            raise ClientError("malformed", f"{self.url}: the answer has no token_strs (return_token_strs)")
        want = probe_text.encode("utf-8")
        for scheme in ("text", "byte_level", "metaspace"):
            got = b"".join(piece_bytes(s, scheme) for s in strs)  # type: ignore[arg-type]
            if got == want or (scheme == "metaspace" and got == b" " + want):
                self.scheme = scheme  # type: ignore[assignment]
                return self.scheme
        raise ClientError("malformed", f"{self.url}: its token strings do not write the probe text back byte for "
                                       f"byte in any known convention")  # fmt: skip

    async def controls(self) -> tuple[tuple[int, bytes], list[str]]:
        """((the end-of-turn id, its bytes): the first control token after an assistant reply; the control
        tokens' texts)."""
        messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _MARKER}]
        ids, strs = await self.chat(messages, None, generation=False)
        controls = sorted({piece_bytes(s, self.scheme).decode("utf-8", "replace") for s in strs if _is_control(s)})
        at, seen = 0, b""
        for i, s in enumerate(strs):  # find the token that ends the marker, then the first control token after it
            seen += piece_bytes(s, self.scheme)
            if _MARKER.encode() in seen:
                at = i + 1
                break
        else:
            raise ClientError("malformed", f"{self.url}: the rendered probe conversation does not hold its reply")
        for token, s in zip(ids[at:], strs[at:], strict=True):
            if _is_control(s):
                return (token, piece_bytes(s, self.scheme)), controls
        raise ClientError("malformed", f"{self.url}: no end-of-turn token after the assistant's reply in the template")

    def metrics(self, reset: bool = False) -> dict[str, float]:
        """Counters of the /tokenize requests under `distill/tokenize/` (requests, retries, latency_s, ...), beside
        the scoring requests' `distill/*`."""
        return {k.replace("teacher/", "distill/", 1): v for k, v in self._session.metrics(reset, always=("requests", "retries")).items()}

    async def aclose(self) -> None:
        await self._session.aclose()


class EndpointTeacherSide(TeacherSide):
    """TeacherSide whose teacher tokenizer and template are the endpoint's (`teacher_turn`)."""

    def __init__(self, remote: EndpointTokenizer, student_tokenizer: Any, end_of_turn: tuple[int, bytes],
                 controls: list[str]) -> None:  # fmt: skip
        # The student's half of TeacherSide (student_text); the teacher's half is remote.
        self.remote = remote
        self.student_bytes = TokenBytes(student_tokenizer)
        self.student_special = {int(i) for i, t in student_tokenizer.added_tokens_decoder.items() if t.special}
        self.teacher_control = controls
        self.end_of_turn, self.end_of_turn_bytes = end_of_turn
        self._prompts: dict[str, asyncio.Task[tuple[list[int], list[str]]]] = {}

    async def _prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> tuple[list[int], list[str]]:
        key = json.dumps([messages, tools], sort_keys=True, ensure_ascii=False)
        task = self._prompts.get(key)
        if task is None:  # the samples of a group share their prompt: one request for all, even scored concurrently
            if len(self._prompts) > 4096:
                self._prompts.clear()
            task = self._prompts[key] = asyncio.ensure_future(self.remote.chat(messages, tools, generation=True))
        try:
            return await asyncio.shield(task)  # one sample cancelled must not cancel the others' request
        except Exception as e:
            if task.done() and self._prompts.get(key) is task:  # a failure is not remembered: a later step asks again
                del self._prompts[key]
            if isinstance(e, ClientError) and e.kind == "bad_request":  # the template refuses the conversation
                raise AlignError("teacher_template", f"the teacher's chat template refused the conversation: {e}") from None
            raise

    async def teacher_turn(self, prompt: list[dict[str, Any]], completion: list[dict[str, Any]],
                           tools: list[dict[str, Any]] | None, student_completion_ids: list[int]) -> TeacherTurn:  # fmt: skip
        text, ends_turn, scored = self.student_text(student_completion_ids)
        prompt_ids, strs = await self._prompt(prompt, tools)
        message = completion[-1] if completion else {}
        if message.get("tool_calls") or message.get("reasoning_content"):
            # Structured parts: comparable only when the teacher's template writes the student's text for them.
            # The whole conversation rendered by the endpoint must extend the prompt's tokens with that text.
            try:
                full_ids, full_strs = await self.remote.chat(prompt + completion, tools, generation=False)
            except ClientError as e:
                if e.kind != "bad_request":
                    raise
                full_ids, full_strs = [], []
            after = b"".join(piece_bytes(p, self.remote.scheme) for p in full_strs[len(prompt_ids) :])
            if full_ids[: len(prompt_ids)] != prompt_ids or not after.startswith(text.encode("utf-8")):
                raise AlignError("tool_call_text", "the teacher's template writes this tool call (or reasoning) "
                                                   "as other text than the student's")  # fmt: skip
        last = max((i for i, s in enumerate(strs) if _is_control(s)), default=None)
        tail_ids = prompt_ids[last:] if last is not None else []
        tail = b"".join(piece_bytes(s, self.remote.scheme) for s in strs[last:]) if last is not None else b""
        completion_ids, pieces = await self.remote.text(tail.decode("utf-8", "replace") + text, special=False) if text else ([], [])
        if completion_ids[: len(tail_ids)] == tail_ids:
            completion_ids, pieces = completion_ids[len(tail_ids) :], pieces[len(tail_ids) :]
        elif last is not None:  # a merge across the boundary: the text as a fresh stretch after the control token
            anchor = piece_bytes(strs[last], self.remote.scheme).decode("utf-8", "replace")
            completion_ids, pieces = await self.remote.text(anchor + text, special=False)
            if completion_ids[:1] == [prompt_ids[last]]:
                completion_ids, pieces = completion_ids[1:], pieces[1:]
            else:
                completion_ids, pieces = await self.remote.text(text, special=False)
        if ends_turn:
            completion_ids, pieces = completion_ids + [self.end_of_turn], pieces + [self.end_of_turn_bytes]
        return TeacherTurn(ids=prompt_ids + completion_ids, completion_start=len(prompt_ids), ends_turn=ends_turn,
                           student_scored=scored, completion_bytes=pieces)  # fmt: skip
