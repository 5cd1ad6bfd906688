"""A batching generation engine over a transformers causal LM, run in one worker thread.

Requests (each with `n` choices) wait in a queue; the worker takes everything pending (up to `max_batch_size`
sequences, gathering while requests keep arriving: each arrival holds the batch open `batch_window_s` longer,
up to `batch_max_wait_s` after the first, so that a burst of requests (an RL step's group, an evaluation's wave)
parsed one by one by the server is served as one batch rather than a lone first request and the rest behind
it, which would cost a whole second decode), left-pads the prompts
into one batch and decodes it to completion with a KV cache, then takes the next batch ("static batching":
requests that arrive mid-batch wait for the next one).

Why our own decode loop rather than `model.generate`: one batch mixes requests with different temperature,
top_p, max_tokens, stop strings and seeds, and we need per-token logprobs and streaming deltas per row;
`generate` takes one generation config per call. The loop is ~40 lines: prefill with `logits_to_keep=1`, then one
token per step for every row still decoding (a finished row leaves the batch, its cache rows dropped) until
every row is done.

Logprobs are those of the model's raw distribution (temperature 1, no top-p), like vLLM's default
`logprobs_mode="raw_logprobs"`, so that a trainer recomputing them needs no sampling settings; with
temperature 1 and top_p 1 they are exactly the sampling distribution.

Runs in a thread because generation blocks: torch releases the GIL in its kernels, so the server's event loop
keeps answering (streaming, /v1/models) while a batch decodes.

One request never fails another: an error while sampling or detokenizing one row fails that row's request only
(the other rows keep decoding), and an error of the whole batch (a forward pass that raises) re-runs each
request of the batch alone, so that only the request that causes it fails (a streaming request that already
sent text gets the error instead, since its text cannot be taken back). A request whose Future is cancelled
(the client went away) stops decoding at the next token and is dropped from the queue if it has not started.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

import torch

GREEDY_BELOW = 1e-5
"""Temperatures below this decode greedily (like vLLM): dividing logits by ~0 overflows to inf/NaN."""


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    """Seeds choice k with seed + k (reproducible for the same batch composition)."""
    top_logprobs: int = 0
    """Alternatives reported per generated token (0: none)."""

    @property
    def stop_hold(self) -> int:
        """Characters of streamed text held back because they may begin a stop string."""
        return max(map(len, self.stop), default=1) - 1


@dataclass
class Completion:
    """One finished choice."""

    token_ids: list[int]
    """Generated ids, including the end-of-turn token when the model emitted one."""
    logprobs: list[float]
    """Raw-model logprob of each generated id (same length as token_ids)."""
    top_logprobs: list[list[tuple[int, float]]]
    """Per generated token, the `top_logprobs` most likely (id, logprob) pairs (empty lists when not asked)."""
    text: str
    """Decoded text without special tokens, cut before the first stop string."""
    finish_reason: str
    """"stop" (end of turn or a stop string) or "length" (max_tokens)."""


DeltaCallback = Callable[[int, str], None]
"""on_delta(choice_index, text): called from the engine thread with each new piece of visible text."""


@dataclass
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    n: int
    on_delta: DeltaCallback | None
    future: Future[list[Completion]]
    error: BaseException | None = None
    """Set when this request failed on its own; its rows stop and its Future gets the exception."""
    sent_text: bool = False
    """Whether on_delta was called (a failed batch cannot re-run this request without repeating its text)."""


class _Row:
    """Decode state of one choice: ids, logprobs and incremental detokenization."""

    def __init__(self, request: _Request, index: int, device: torch.device) -> None:
        self.request = request
        self.index = index
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.top: list[list[tuple[int, float]]] = []
        self.text = ""
        self.emitted = 0
        self.finish_reason: str | None = None
        # Incremental detokenization offsets (decode a small window; hold back incomplete UTF-8 sequences).
        self.prefix_offset = 0
        self.read_offset = 0
        seed = request.params.seed
        self.generator = None if seed is None else torch.Generator(device=device).manual_seed(seed + index)


class BatchEngine:
    """Owns the model and one worker thread; `submit` is thread-safe and returns a Future."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_batch_size: int = 32,
        batch_window_s: float = 0.02,
        batch_max_wait_s: float = 0.2,
        weights_path: str = "",
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.batch_window_s = batch_window_s
        self.batch_max_wait_s = max(batch_window_s, batch_max_wait_s)
        self.device = next(model.parameters()).device
        self.eos_ids = _eos_ids(model, tokenizer)
        self.pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
        self.stats: dict[str, float] = {"inference/batches": 0, "inference/requests": 0, "inference/sequences": 0,
                                        "inference/prefilled_prompts": 0, "inference/generated_tokens": 0,
                                        "inference/weights_version": 0,
                                        "inference/weights_step": 0, "inference/failed_requests": 0,
                                        "inference/cancelled_requests": 0, "inference/solo_reruns": 0}  # fmt: skip
        self.weights: dict[str, Any] = {"step": 0, "path": weights_path}
        """Trainer step and directory of the weights that requests admitted now sample with (step 0: initial)."""
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._carry: deque[_Request] = deque()
        self._thread = threading.Thread(target=self._loop, name="apprentice-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def submit(
        self, prompt_ids: list[int], params: SamplingParams, n: int = 1, on_delta: DeltaCallback | None = None
    ) -> Future[list[Completion]]:
        """Queue a request; `future.cancel()` stops its generation (e.g. when the client disconnects)."""
        future: Future[list[Completion]] = Future()
        self._queue.put(_Request(list(prompt_ids), params, n, on_delta, future))
        return future

    def swap(self, model: Any, step: int, path: str) -> None:
        """Replace the weights atomically: batches in flight finish on the old model, the next uses the new one."""
        self.model = model
        self.weights = {"step": step, "path": path}
        self.stats["inference/weights_version"] += 1
        self.stats["inference/weights_step"] = step

    # ---- worker thread ----

    def _loop(self) -> None:
        while True:
            batch = self._collect()
            if batch is None:
                return
            try:
                self._generate(batch)
            except Exception as e:
                self._isolate(batch, e)
            except BaseException as e:  # not a request's fault: fail this batch, keep serving the next ones
                for request in batch:
                    self._finish(request, e)

    def _isolate(self, batch: list[_Request], error: Exception) -> None:
        """After a whole-batch failure: re-run each pending request alone, so only the culprit fails."""
        pending = [r for r in batch if not r.future.done()]
        for request in pending:
            if len(batch) == 1 or request.sent_text:
                self._finish(request, error)
                continue
            self.stats["inference/solo_reruns"] += 1
            request.error = None
            try:
                self._generate([request])
            except Exception as e:
                self._finish(request, e)

    def _finish(self, request: _Request, error: BaseException | None, rows: list[_Row] | None = None) -> None:
        """Resolve a request's Future (unless the client cancelled it) with its completions or its error."""
        if request.future.cancelled():
            self.stats["inference/cancelled_requests"] += 1
            return
        try:  # the client may cancel between the check above and here
            if error is not None:
                self.stats["inference/failed_requests"] += 1
                request.future.set_exception(error)
            else:
                request.future.set_result([_completion(row) for row in rows or [] if row.request is request])
        except InvalidStateError:
            pass

    def _collect(self) -> list[_Request] | None:
        while True:  # skip requests cancelled while they waited
            first = self._carry.popleft() if self._carry else self._queue.get()
            if first is None:
                return None
            if not first.future.cancelled():
                break
            self.stats["inference/cancelled_requests"] += 1
        batch, rows = [first], first.n
        opened = time.monotonic()
        deadline = opened + self.batch_window_s
        while rows < self.max_batch_size:
            if self._carry:
                item: _Request | None = self._carry.popleft()
            else:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
            if item is None:  # stop requested: finish this batch first
                self._queue.put(None)
                break
            if item.future.cancelled():
                self.stats["inference/cancelled_requests"] += 1
                continue
            if rows + item.n > self.max_batch_size:
                self._carry.appendleft(item)
                break
            batch.append(item)
            rows += item.n
            deadline = min(opened + self.batch_max_wait_s, time.monotonic() + self.batch_window_s)
        return batch

    def _generate(self, batch: list[_Request]) -> None:
        model = self.model  # one reference for the whole batch: a concurrent swap takes effect next batch
        rows: list[_Row] = []
        for request in batch:
            try:
                rows += [_Row(request, k, self.device) for k in range(request.n)]
            except Exception as e:  # e.g. a seed torch refuses: this request fails, the others go on
                request.error = e
        if rows:
            self.stats["inference/batches"] += 1
            self.stats["inference/requests"] += len({id(row.request) for row in rows})
            self.stats["inference/sequences"] += len(rows)
            self._decode(model, rows)
        for request in batch:
            self._finish(request, request.error, rows)

    @torch.inference_mode()
    def _decode(self, model: Any, rows: list[_Row]) -> None:
        """Prefill the left-padded prompts of `rows`, then decode one token per row until every row is done.

        Each distinct prompt is prefilled once (the answers of a group, n choices of a request) and its cache
        row copied to every row that decodes from it: an RL step of 4 prompts x 4 answers prefills 4 rows, not 16.
        """
        prompts: dict[tuple[int, ...], int] = {}
        source = [prompts.setdefault(tuple(row.request.prompt_ids), len(prompts)) for row in rows]  # [B] -> [U]
        width = max(len(p) for p in prompts)
        ids_U_T = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask_U_T = torch.zeros((len(prompts), width), dtype=torch.long)
        for u, prompt in enumerate(prompts):
            ids_U_T[u, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask_U_T[u, width - len(prompt) :] = 1
        ids_U_T, mask_U_T = ids_U_T.to(self.device), mask_U_T.to(self.device)
        pos_U_T = (mask_U_T.cumsum(-1) - 1).clamp(min=0)

        self.stats["inference/prefilled_prompts"] += len(prompts)
        out = model(input_ids=ids_U_T, attention_mask=mask_U_T, position_ids=pos_U_T, use_cache=True, logits_to_keep=1)
        index_B = torch.tensor(source, dtype=torch.long, device=self.device)
        logits_B_V = out.logits[:, -1, :].float().index_select(0, index_B)
        if len(prompts) < len(rows):
            out.cache.reorder_cache(index_B)  # every row's own copy of its prompt's keys and values
        mask_B_T, pos_B_T = mask_U_T[index_B], pos_U_T[index_B]
        max_steps = max(r.request.params.max_tokens for r in rows)
        live = rows  # the rows still decoding, in batch order
        for step in range(max_steps):
            if step:
                logits_B_V = out.logits[:, -1, :].float()
            next_B = self._step(live, logits_B_V)
            keep = [b for b, row in enumerate(live) if row.finish_reason is None]
            if not keep:
                break
            if len(keep) < len(live):  # finished rows leave the batch: a long answer no longer drags the short ones
                index_B = torch.tensor(keep, dtype=torch.long, device=self.device)
                out.cache.reorder_cache(index_B)
                next_B, mask_B_T, pos_B_T = next_B[index_B], mask_B_T[index_B], pos_B_T[index_B]
                live = [live[b] for b in keep]
            mask_B_T = torch.cat([mask_B_T, mask_B_T.new_ones((len(live), 1))], dim=1)
            pos_B_T = pos_B_T[:, -1:] + 1
            out = model(
                input_ids=next_B[:, None],
                attention_mask=mask_B_T,
                position_ids=pos_B_T,
                cache=out.cache,
                use_cache=True,
            )

    def _step(self, rows: list[_Row], logits_B_V: torch.Tensor) -> torch.Tensor:
        """Sample one token per row, record it on unfinished rows; returns the ids to feed next [B]."""
        logprobs_B_V = torch.log_softmax(logits_B_V, dim=-1)
        next_ids: list[int] = []
        for b, row in enumerate(rows):
            request = row.request
            if row.finish_reason is None and (request.error is not None or request.future.cancelled()):
                row.finish_reason = "abort"
            if row.finish_reason is not None:
                next_ids.append(self.pad_id)
                continue
            try:
                token = self._record(row, logits_B_V[b], logprobs_B_V[b])
            except Exception as e:  # this request fails; the other rows keep decoding
                request.error = e
                row.finish_reason = "abort"
                token = self.pad_id
            next_ids.append(token)
        return torch.tensor(next_ids, dtype=torch.long, device=self.device)

    def _record(self, row: _Row, logits_V: torch.Tensor, logprobs_V: torch.Tensor) -> int:
        """Sample the row's next token and append it (ids, logprobs, text); returns the token."""
        token = _sample(logits_V, row.request.params, row.generator)
        row.ids.append(token)
        row.logprobs.append(float(logprobs_V[token]))
        k = row.request.params.top_logprobs
        if k:
            values, indices = logprobs_V.topk(k)
            row.top.append(list(zip(indices.tolist(), values.tolist(), strict=True)))
        else:
            row.top.append([])
        self.stats["inference/generated_tokens"] += 1
        self._advance_text(row, token)
        return token

    def _advance_text(self, row: _Row, token: int) -> None:
        params = row.request.params
        if token in self.eos_ids:
            row.finish_reason = "stop"
        else:
            prefix = self.tokenizer.decode(row.ids[row.prefix_offset : row.read_offset], skip_special_tokens=True)
            full = self.tokenizer.decode(row.ids[row.prefix_offset :], skip_special_tokens=True)
            if len(full) > len(prefix) and not full.endswith("\ufffd"):
                new = full[len(prefix) :]
                row.text += new
                row.prefix_offset, row.read_offset = row.read_offset, len(row.ids)
                cut = _find_stop(row.text, params.stop, len(new))
                if cut is not None:
                    row.text = row.text[:cut]
                    row.finish_reason = "stop"
        if row.finish_reason is None and len(row.ids) >= params.max_tokens:
            row.finish_reason = "length"
        if row.finish_reason is not None:
            # The final text is one decode of all ids (incremental decoding can split invalid UTF-8 differently),
            # so that content == decode(token_ids) up to the stop string, for the token client.
            full = self.tokenizer.decode(row.ids, skip_special_tokens=True)
            cut = _find_stop(full, params.stop, len(full))
            row.text = full if cut is None else full[:cut]
        if row.request.on_delta is not None:
            # Hold back text that may be the start of a stop string until we know it is not.
            hold = 0 if row.finish_reason is not None else params.stop_hold
            end = max(row.emitted, len(row.text) - hold)
            if end > row.emitted:
                row.request.sent_text = True
                row.request.on_delta(row.index, row.text[row.emitted : end])
                row.emitted = end


def _sample(logits_V: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    if params.temperature < GREEDY_BELOW:
        return int(logits_V.argmax())
    probs_V = torch.softmax(logits_V / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs_V.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
        drop = sorted_p.cumsum(-1) - sorted_p >= params.top_p
        sorted_p[drop] = 0.0
        probs_V = torch.zeros_like(probs_V).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs_V, 1, generator=generator))


def _find_stop(text: str, stops: list[str], new_chars: int) -> int | None:
    """Index where the earliest stop string starts, searching only where the new text could complete one."""
    if not stops:
        return None
    found = [i for s in stops if (i := text.find(s, max(0, len(text) - new_chars - len(s) + 1))) >= 0]
    return min(found) if found else None


def _completion(row: _Row) -> Completion:
    return Completion(row.ids, row.logprobs, row.top, row.text, row.finish_reason or "length")


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """End-of-turn ids: the generation config's (an int or a list) plus the tokenizer's eos token."""
    ids: set[int] = set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (config_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(int(v) for v in value)
    return ids
