"""The teacher's tokenizer over llama.cpp's llama-server (tools/server/server-context.cpp, `post_apply_template`
and `post_tokenize`), both at the server root beside /v1:

    POST /apply-template {"messages": [...], "tools": [...], "add_generation_prompt": true}
        -> {"prompt": "<the conversation in the GGUF's chat template>"}    (the server's own rendering, BOS left
           out when the vocabulary adds one: tokenizing with add_special puts it back, as a chat request does)
    POST /tokenize {"content": text, "add_special": bool, "parse_special": bool, "with_pieces": true}
        -> {"tokens": [{"id": 42, "piece": "text"}, {"id": 7, "piece": [240, 159]}, ...]}

A piece is the token's text, or its bytes as a list of integers when they are no UTF-8 text (part of a
character, a byte-fallback token): exact bytes either way. The template's text is tokenized with control tokens
parsed (add_special and parse_special true: what llama-server feeds the model for a chat request); the student's
text never is (parse_special false), so a text holding "<|im_end|>" stays text.

A token is a control token when its text, tokenized with control tokens left unparsed, does not give it back:
asked once per token whose text looks like one ("<...>", "[...]"), then remembered. Tokens the vocabulary matches
in plain text (a user-defined "<think>") are ordinary, as they are for a local Hugging Face tokenizer.

A chat whose last message is the assistant's is continued by llama-server, never closed, so a finished turn is
rendered with a user message after it (`closed_turn`); templates that write history differently once a later
user message exists (reasoning dropped from earlier turns) then set such turns aside as `tool_call_text`.
"""

from __future__ import annotations

from typing import Any

from apprentice.clients.base import ClientError
from apprentice.clients.http import RawResponse
from apprentice.clients.session import EndpointSession, SetAside
from apprentice.config import EndpointConfig
from apprentice.crosstok.endpoint import Pieces, session_metrics
from apprentice.crosstok.vllm_tokenize import looks_like_control, tokenize_root

_NEXT_USER = "Xq7 next"


def piece_of(entry: Any) -> tuple[int, bytes] | None:
    """(id, bytes) of one `{"id": n, "piece": str | [byte ints]}` entry; None when it is not that shape."""
    if not isinstance(entry, dict) or not isinstance(entry.get("id"), int) or isinstance(entry.get("id"), bool):
        return None
    piece = entry.get("piece")
    if isinstance(piece, str):
        return entry["id"], piece.encode("utf-8")
    if isinstance(piece, list) and all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b < 256 for b in piece):
        return entry["id"], bytes(piece)
    return None


class LlamaCppTokenizer:
    """The teacher's tokenizer and template over llama-server's /apply-template and /tokenize."""

    protocol = "llama.cpp"

    def __init__(self, endpoint: EndpointConfig, *, max_concurrency: int) -> None:
        self.endpoint = endpoint
        root = tokenize_root(endpoint.base_url)
        self.url = f"{root}/tokenize"
        self.template_url = f"{root}/apply-template"
        self._tokenize, self._template = (
            EndpointSession(endpoint, url, max_concurrency=max_concurrency, max_response_bytes=16 * 1024 * 1024,
                            section="orchestrator.teacher_model", prefix="teacher/tokenize/")  # fmt: skip
            for url in (self.url, self.template_url)
        )
        self._control: dict[int, bool] = {}

    async def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> tuple[list[int], list[bytes]]:
        """(ids, each token's bytes) of `text`; ClientError when it fails for good."""

        def read(raw: RawResponse, data: Any) -> tuple[list[int], list[bytes]]:
            tokens = data.get("tokens") if isinstance(data, dict) else None
            found = [piece_of(t) for t in tokens] if isinstance(tokens, list) else [None]
            if any(f is None for f in found) or (text and not found):
                raise ClientError("malformed", f"{self.url}: the answer is not llama.cpp's 'tokens' list of "
                                               f"{{id, piece}} (with_pieces)")  # fmt: skip
            return [f[0] for f in found if f], [f[1] for f in found if f]

        body = {"model": self.endpoint.model, "content": text, "add_special": add_special,
                "parse_special": parse_special, "with_pieces": True}  # fmt: skip
        try:
            return await self._tokenize.request(body, read)
        except SetAside as e:
            raise ClientError(e.kind, str(e)) from None

    async def apply_template(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, *,
                             generation: bool) -> str:  # fmt: skip
        def read(raw: RawResponse, data: Any) -> str:
            prompt = data.get("prompt") if isinstance(data, dict) else None
            if not isinstance(prompt, str):
                raise ClientError("malformed", f"{self.template_url}: no 'prompt' text in the answer")
            return prompt

        body: dict[str, Any] = {"model": self.endpoint.model, "messages": messages, "add_generation_prompt": generation}
        if tools:
            body["tools"] = tools
        try:
            return await self._template.request(body, read)
        except SetAside as e:
            raise ClientError(e.kind, str(e)) from None

    async def is_control(self, token: int, piece: bytes) -> bool:
        if token not in self._control:
            text = piece.decode("utf-8", "replace")
            control = False
            if looks_like_control(text):  # parsed only as a control token: left unparsed it is other tokens
                ids, _ = await self.tokenize(text, add_special=False, parse_special=False)
                control = ids != [token]
            self._control[token] = control
        return self._control[token]

    async def _pieces(self, text: str) -> Pieces:
        ids, pieces = await self.tokenize(text, add_special=True, parse_special=True)
        return Pieces(ids, pieces, [await self.is_control(t, p) for t, p in zip(ids, pieces, strict=True)])

    async def chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> Pieces:
        return await self._pieces(await self.apply_template(messages, tools, generation=True))

    async def closed_turn(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> Pieces:
        then = [*messages, {"role": "user", "content": _NEXT_USER}]
        return await self._pieces(await self.apply_template(then, tools, generation=False))

    async def probe_ids(self, text: str) -> list[int]:
        """Checks that both endpoints answer in llama.cpp's shapes (a vLLM server answers /tokenize in its own)."""
        await self.apply_template([{"role": "user", "content": "Hi"}], None, generation=True)
        ids, _ = await self.tokenize(text, add_special=True, parse_special=False)
        return ids

    async def continuation(self, prompt: Pieces, text: str) -> tuple[list[int], list[bytes]]:
        # llama.cpp tokenizes the text between control tokens on its own, so the prompt's tail after its last
        # control token is the whole context a BPE merge can reach across.
        last = prompt.last_control()
        start = 0 if last is None else last + 1
        tail_ids = prompt.ids[start:]
        tail = b"".join(prompt.pieces[start:]).decode("utf-8", "replace")
        # A SentencePiece vocabulary with a space prefix writes one before the text after a control token: the
        # tail's pieces hold it, and tokenizing the tail again adds it again, so it is also tried without it.
        for head in dict.fromkeys([tail, tail[1:] if tail.startswith(" ") else tail]) if tail_ids else []:
            ids, pieces = await self.tokenize(head + text, add_special=False, parse_special=False)
            if ids[: len(tail_ids)] == tail_ids:
                return ids[len(tail_ids) :], pieces[len(tail_ids) :]
        # No tail, or a merge across the boundary: the text as a fresh stretch after the control token.
        return await self.tokenize(text, add_special=False, parse_special=False)

    def metrics(self, reset: bool = False) -> dict[str, float]:
        return session_metrics([self._tokenize, self._template], reset)

    async def aclose(self) -> None:
        await self._tokenize.aclose()
        await self._template.aclose()
