"""The teacher's tokenizer over vLLM's `POST /tokenize` (which `apprentice serve` also answers):

    {"model": M, "messages": [...], "tools": [...], "add_generation_prompt": true, "return_token_strs": true}
        -> the prompt's ids, in the teacher's template, with its generation prompt
    {"model": M, "prompt": tail + text, "add_special_tokens": false, "return_token_strs": true}
        -> the completion's ids as a continuation of the prompt (`tail`: the prompt from its last control token
           on, as render/align.py's `Tokens.continuation` does locally), and each token's bytes

A token's bytes are read from its string in one of three conventions, fixed once at startup by which of them
writes a probe text back byte for byte: vLLM's `convert_ids_to_tokens` pieces, byte-level BPE ("Ġ" a space) or
SentencePiece-style ("▁" a space, "<0xF0>" a byte), and OpenAI's text pieces (`apprentice serve`: a token's
text, "bytes:\\xf0\\x9f" for part of a character). vLLM says nothing of which tokens are special: control tokens
are the template's tokens written "<...>" or "[...]".
"""

from __future__ import annotations

import re
from typing import Any, Literal

from apprentice import tokenbytes
from apprentice.clients.base import ClientError
from apprentice.clients.http import RawResponse
from apprentice.clients.session import EndpointSession, SetAside
from apprentice.config import EndpointConfig
from apprentice.crosstok.endpoint import Pieces, session_metrics

Scheme = Literal["text", "byte_level", "metaspace"]
_TEXT_BYTES = re.compile(r"\\x([0-9a-fA-F]{2})")
CONTROL = re.compile(r"^(<[^<>\s]{2,}>|\[[A-Z_/]{2,}\])$")
"""How a control token's text looks (<|im_end|>, <end_of_turn>, [INST]); a byte-fallback piece <0xF0> is not one."""


def piece_bytes(piece: str, scheme: Scheme) -> bytes:
    """The bytes a token string stands for, in `scheme` (module docstring)."""
    if scheme == "text":
        if piece.startswith("bytes:"):
            return bytes(int(h, 16) for h in _TEXT_BYTES.findall(piece))
        return piece.encode("utf-8")
    return tokenbytes.piece_bytes(piece, byte_level=scheme == "byte_level")


def looks_like_control(piece: str) -> bool:
    return bool(CONTROL.match(piece)) and not tokenbytes.BYTE_FALLBACK.match(piece)


def tokenize_root(base_url: str) -> str:
    """vLLM and llama.cpp serve /tokenize beside /v1, not under it."""
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


class VllmTokenizer:
    """The teacher's tokenizer and template over vLLM's `POST /tokenize` (one session, bounded like the scorers)."""

    protocol = "vllm"

    def __init__(self, endpoint: EndpointConfig, *, max_concurrency: int) -> None:
        self.endpoint = endpoint
        self.url = f"{tokenize_root(endpoint.base_url)}/tokenize"
        self._session = EndpointSession(endpoint, self.url, max_concurrency=max_concurrency,
                                        max_response_bytes=16 * 1024 * 1024, section="orchestrator.teacher_model",
                                        prefix="teacher/tokenize/")  # fmt: skip
        self.scheme: Scheme = "text"

    async def request(self, body: dict[str, Any]) -> tuple[list[int], list[str]]:
        """(ids, token strings); ClientError when it fails for good."""

        def read(raw: RawResponse, data: Any) -> tuple[list[int], list[str]]:
            tokens = data.get("tokens") if isinstance(data, dict) else None
            strs = data.get("token_strs") if isinstance(data, dict) else None
            if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
                raise ClientError("malformed", f"{self.url}: no 'tokens' list of ids in the answer")
            if strs is None:
                raise ClientError("malformed", f"{self.url}: the answer has no token_strs (return_token_strs)")
            if not isinstance(strs, list) or len(strs) != len(tokens) or not all(isinstance(s, str) for s in strs):
                raise ClientError("malformed", f"{self.url}: 'token_strs' does not match 'tokens'")
            return tokens, strs

        try:
            return await self._session.request({"model": self.endpoint.model, **body, "return_token_strs": True}, read)
        except SetAside as e:
            raise ClientError(e.kind, str(e)) from None

    async def text(self, text: str, *, special: bool) -> tuple[list[int], list[bytes]]:
        ids, strs = await self.request({"prompt": text, "add_special_tokens": special})
        return ids, [piece_bytes(s, self.scheme) for s in strs]

    async def _chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, *, generation: bool) -> Pieces:
        body: dict[str, Any] = {"messages": messages, "add_generation_prompt": generation}
        if tools:
            body["tools"] = tools
        ids, strs = await self.request(body)
        return Pieces(ids, [piece_bytes(s, self.scheme) for s in strs], [looks_like_control(s) for s in strs])

    async def chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> Pieces:
        return await self._chat(messages, tools, generation=True)

    async def closed_turn(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> Pieces:
        return await self._chat(messages, tools, generation=False)

    async def probe_ids(self, text: str) -> list[int]:
        """Also fixes the convention of the token strings: the one that writes `text` back byte for byte."""
        _, strs = await self.request({"prompt": text, "add_special_tokens": False})
        want = text.encode("utf-8")
        for scheme in ("text", "byte_level", "metaspace"):
            got = b"".join(piece_bytes(s, scheme) for s in strs)  # type: ignore[arg-type]
            if got == want or (scheme == "metaspace" and got == b" " + want):
                self.scheme = scheme  # type: ignore[assignment]
                ids, _ = await self.text(text, special=True)
                return ids
        raise ClientError("malformed", f"{self.url}: its token strings do not write the probe text back byte for "
                                       f"byte in any known convention")  # fmt: skip

    async def continuation(self, prompt: Pieces, text: str) -> tuple[list[int], list[bytes]]:
        last = prompt.last_control()
        if last is None:
            return await self.text(text, special=False)
        tail_ids = prompt.ids[last:]
        tail = b"".join(prompt.pieces[last:]).decode("utf-8", "replace")
        ids, pieces = await self.text(tail + text, special=False)
        if ids[: len(tail_ids)] == tail_ids:
            return ids[len(tail_ids) :], pieces[len(tail_ids) :]
        # A merge across the boundary: the text as a fresh stretch after the control token.
        ids, pieces = await self.text(prompt.pieces[last].decode("utf-8", "replace") + text, special=False)
        if ids[:1] == [prompt.ids[last]]:
            return ids[1:], pieces[1:]
        return await self.text(text, special=False)

    def metrics(self, reset: bool = False) -> dict[str, float]:
        return session_metrics([self._session], reset)

    async def aclose(self) -> None:
        await self._session.aclose()
