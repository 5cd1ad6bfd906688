"""The teacher probe, once at startup: does the teacher share the student's token ids, which scoring protocol
does its endpoint speak, and how noisy are its scores.

1. Tokenizer. When the endpoint (or the server `tokenizer` names by URL) tokenizes with its template, by
   vLLM's `POST /tokenize` or llama.cpp's `/apply-template` + `/tokenize` (tried in that order), the teacher's
   ids of a probe text come from it, and so does the teacher side of every turn (endpoint.py): what the server
   itself serves, template included. Else, with a teacher tokenizer at hand (`[orchestrator.teacher_model] tokenizer`,
   or `model` being a local directory) the two are compared by vocabulary and by the ids of a probe text.
   Without either, the endpoint scores the probe text and reports its ids (vLLM's prompt_logprobs on a text
   prompt). Identical ids: today's same-tokenizer path, unchanged. Different ids: the cross-tokenizer path,
   over /tokenize or the local tokenizer (a clear error names both options otherwise).
2. Protocol. `scoring = "auto"` tries vLLM's `prompt_logprobs`, then legacy `echo` + `logprobs`; a fixed
   choice is checked. The first that scores the probe's ids is used for the whole run.
3. Self-test. The probe is scored twice more (never from the cache); `distill/teacher_noise` is the mean absolute
   difference of the two per-token logprobs. Above `max_noise` the run stops: replicas that disagree by more
   than the signal (a per-token reverse KL of a few tenths of a nat) would train the student on noise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from apprentice.clients.base import ClientError
from apprentice.clients.echo import EchoScoringClient
from apprentice.clients.scoring import PromptScores, TeacherScoringClient
from apprentice.config import ConfigError
from apprentice.config.orchestrator import TeacherEndpointConfig
from apprentice.crosstok.endpoint import EndpointTeacherSide, RemoteTokenizer, find_controls
from apprentice.crosstok.token_bytes import TokenBytes, UnsupportedTokenizer

log = logging.getLogger(__name__)

Protocol = Literal["prompt_logprobs", "echo"]

# Plain text with spaces, digits, punctuation, accents, CJK and an emoji: tokenizers that differ anywhere in
# pre-tokenization, merges or byte fallback give different ids for it.
PROBE_TEXT = "Tokenizer probe: The quick brown fox, 1234567 + 89.5%; naïve café — 東京 🙂\n\tif (x) { return y; }"


_UNSUPPORTED = ("malformed", "bad_request", "not_found")
"""Probe failures that mean "this endpoint does not speak that protocol" (try the next one)."""


@dataclass
class TeacherProbe:
    same_tokenizer: bool
    protocol: Protocol
    noise: float
    """Mean absolute difference of two scorings of the probe (nats per token): distill/teacher_noise."""
    teacher_tokenizer: Any | None
    """The teacher's tokenizer (with its chat template) when it differs from the student's and the endpoint cannot
    tokenize for us."""
    remote: EndpointTeacherSide | None = None
    """The teacher side over a server that tokenizes (vLLM /tokenize, llama.cpp), when it differs from the
    student's and one answers."""


def where(endpoint: TeacherEndpointConfig) -> str:
    return f"orchestrator.teacher_model ({endpoint.base_url}, model {endpoint.model!r})"


def load_teacher_tokenizer(endpoint: TeacherEndpointConfig) -> Any | None:
    """`tokenizer`, else `model` when it is a local directory, else None (also when `tokenizer` is a server)."""
    from transformers import AutoTokenizer

    if endpoint.tokenizer_url is not None:
        return None
    source = endpoint.tokenizer or (endpoint.model if Path(endpoint.model).is_dir() else None)
    if source is None:
        return None
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        key = "tokenizer" if endpoint.tokenizer else "model"
        raise ConfigError(f"orchestrator.teacher_model.{key} = {source!r}: cannot load a tokenizer from it "
                          f"({str(e).splitlines()[0]}); give a Hugging Face directory or an already cached hub id") from None  # fmt: skip


def _same_local(teacher: Any, student: Any) -> bool:
    if teacher.get_vocab() != student.get_vocab():
        return False
    return bool(teacher(PROBE_TEXT)["input_ids"] == student(PROBE_TEXT)["input_ids"])


def refused_top_k(client: TeacherScoringClient, e: ClientError) -> ConfigError:
    endpoint = client.endpoint
    return ConfigError(
        f"orchestrator.on_policy_distill.top_k = {client.top_k}: the teacher ({endpoint.base_url}, model "
        f"{endpoint.model!r}) refused prompt_logprobs = {client.top_k} at startup ({e}). vLLM returns at most "
        f"its --max-logprobs (20 by default), `apprentice serve` 20: lower top_k, or raise the server's limit."
    )


def check_topk_width(scores: PromptScores, client: TeacherScoringClient) -> None:
    """The probe's answer must hold top_k entries per position: a server that silently returns fewer would
    train on truncated distributions (a bigger tail than the user asked for)."""
    widths = [len(row) for row in scores.topk_ids or [] if row]
    if not widths or min(widths) < client.top_k:
        endpoint = client.endpoint
        raise ConfigError(
            f"orchestrator.on_policy_distill.top_k = {client.top_k}, but the teacher ({endpoint.base_url}, model "
            f"{endpoint.model!r}) returned at most {max(widths, default=0)} candidates per position when probed at "
            f"startup: lower top_k to {min(widths, default=0)} or serve the teacher with a higher logprobs limit."
        )


async def _same_at_endpoint(client: TeacherScoringClient, student: Any, endpoint: TeacherEndpointConfig) -> bool:
    try:
        scores = await client.score(PROBE_TEXT, return_token_ids=True)
    except ClientError as e:
        if client.top_k and e.kind == "bad_request":
            raise refused_top_k(client, e) from None
        raise ConfigError(
            f"{where(endpoint)}: cannot tell whether the teacher shares the student's tokenizer: scoring a probe "
            f"text failed ({e}). Set [orchestrator.teacher_model] tokenizer = \"<HF directory or cached hub id>\" "
            f"(the teacher's tokenizer and chat template)"
        ) from None
    if client.top_k:
        check_topk_width(scores, client)
    t_ids, s_ids = scores.token_ids or [], list(student(PROBE_TEXT)["input_ids"])
    if t_ids and t_ids[0] == -1:  # no prompt_token_ids: the first id is unknown, compare from position 1
        t_ids, s_ids = t_ids[1:], s_ids[1:]
    return t_ids == s_ids


def _noise(a: PromptScores, b: PromptScores) -> float:
    pairs = [(x, y) for x, y in zip(a.logprobs, b.logprobs, strict=False) if x is not None and y is not None]
    return sum(abs(x - y) for x, y in pairs) / len(pairs) if pairs else 0.0


async def _remote_tokenizer(remotes: list[RemoteTokenizer], endpoint: TeacherEndpointConfig
                            ) -> tuple[RemoteTokenizer, list[int]] | None:  # fmt: skip
    """The first of `remotes` (one per protocol, same server) that answers, with the teacher's ids of the probe
    text; None when none does (then a `tokenizer` URL is an error: it names a server for exactly this)."""
    failures = []
    for remote in remotes:
        try:
            return remote, await remote.probe_ids(PROBE_TEXT)
        except ClientError as e:
            failures.append(f"{remote.protocol}: {e}")
    if remotes and endpoint.tokenizer_url is not None:
        raise ConfigError(
            f"orchestrator.teacher_model.tokenizer = {endpoint.tokenizer_url!r} answers neither vLLM's POST /tokenize "
            f"nor llama.cpp's POST /apply-template + /tokenize ({'; '.join(failures)}). Point it at a running vLLM "
            f"or llama-server (the server root or its /v1) that serves the teacher's tokenizer and chat template, "
            f"or at a Hugging Face directory / cached hub id"
        )
    if remotes:
        log.info("%s does not tokenize with its template (%s): the teacher's tokenizer is needed locally",
                 where(endpoint), "; ".join(failures))  # fmt: skip
    return None


async def probe_teacher(
    endpoint: TeacherEndpointConfig, prompt_logprobs: TeacherScoringClient, echo: EchoScoringClient, student: Any,
    remotes: list[RemoteTokenizer] | None = None,
) -> TeacherProbe:
    """Run the probe (module docstring); ConfigError with the fix on any failure. The clients must have no cache:
    the self-test asks the teacher itself twice. `remotes`: the server's tokenizer, one client per protocol, tried
    in order before a local tokenizer."""
    found = await _remote_tokenizer(remotes or [], endpoint)
    remote, remote_ids = found if found is not None else (None, None)
    teacher = load_teacher_tokenizer(endpoint)
    side: EndpointTeacherSide | None = None
    if remote_ids is not None:
        same = remote_ids == list(student(PROBE_TEXT)["input_ids"])
    elif teacher is not None:
        same = _same_local(teacher, student)
    else:
        same = await _same_at_endpoint(prompt_logprobs, student, endpoint)
    if not same and remote_ids is not None and remote is not None:
        try:
            end_of_turn, controls = await find_controls(remote)
            side = EndpointTeacherSide(remote, student, end_of_turn, controls)
        except ClientError as e:
            log.info("%s: cannot find the teacher's end of turn over %s (%s)", where(endpoint), remote.url, e)
    if not same and side is None and teacher is None:
        raise ConfigError(
            f"{where(endpoint)} tokenizes differently from the student. Scoring the student's text with it needs "
            f"the teacher's own tokenizer and chat template: serve the teacher where POST /tokenize takes messages "
            f"(vLLM, `apprentice serve`), or set [orchestrator.teacher_model] tokenizer = "
            f"\"<HF directory or cached hub id of the teacher>\" (or the URL of a llama-server serving its GGUF)"
        )
    if not same and prompt_logprobs.top_k:
        raise ConfigError(
            f"orchestrator.on_policy_distill.top_k = {prompt_logprobs.top_k} needs a teacher with the student's "
            f"tokenizer: {where(endpoint)} has another, and its top-k are ids of its own vocabulary with no "
            f"per-position counterpart in the student's. Set top_k = 0 (the sampled-text estimator, aligned "
            f"by bytes) for this teacher"
        )
    if not same and side is None:
        assert teacher is not None
        if not getattr(teacher, "chat_template", None):
            raise ConfigError(f"{where(endpoint)}: the teacher's tokenizer has no chat template, so the conversation "
                              f"cannot be written as the teacher sees it; point tokenizer at one that has")  # fmt: skip
    if not same:
        for name, tok in (("teacher", teacher if side is None else None), ("student", student)):
            if tok is None:
                continue
            try:
                problem = TokenBytes(tok).roundtrip_problem(PROBE_TEXT)
            except UnsupportedTokenizer as e:
                raise ConfigError(f"{where(endpoint)}: the {name}'s tokenizer cannot be aligned by bytes: {e}") from None
            if problem is not None:
                log.warning("the %s's tokenizer does not write the probe text back byte for byte (%s): turns it cannot "
                            "write are set aside as distill/set_aside/text_mismatch", name, problem)  # fmt: skip
    if remote_ids is not None:
        probe_ids = remote_ids
    else:
        probe_tok = student if same or teacher is None else teacher
        probe_ids = list(probe_tok(PROBE_TEXT)["input_ids"])
    order: list[Protocol] = ["prompt_logprobs", "echo"] if endpoint.scoring == "auto" else [endpoint.scoring]
    failures: list[str] = []
    llama_scores = remote is not None and remote.protocol == "llama.cpp" and endpoint.tokenizer_url is None
    if prompt_logprobs.top_k:  # top-k targets come from prompt_logprobs only (echo's alternatives are keyed by text)
        if "prompt_logprobs" not in order:
            raise ConfigError(f"orchestrator.on_policy_distill.top_k = {prompt_logprobs.top_k} needs scoring = "
                              f"\"prompt_logprobs\" or \"auto\" in [orchestrator.teacher_model], not \"echo\"")  # fmt: skip
        order = ["prompt_logprobs"]
    for protocol in order:
        scorer = prompt_logprobs if protocol == "prompt_logprobs" else echo
        try:
            first = await scorer.score(probe_ids)
        except ClientError as e:
            if protocol == "prompt_logprobs" and prompt_logprobs.top_k and e.kind == "bad_request":
                raise refused_top_k(prompt_logprobs, e) from None
            if e.kind not in _UNSUPPORTED:  # the protocol is spoken but the teacher is broken or down: say so
                raise ConfigError(f"{where(endpoint)} failed to score the startup probe with {protocol} "
                                  f"({e.kind}): {e}") from None  # fmt: skip
            failures.append(f"{protocol}: {e}")
            continue
        if protocol == "prompt_logprobs" and prompt_logprobs.top_k:
            check_topk_width(first, prompt_logprobs)
        if any(lp is None for lp in first.logprobs[1:]):
            failures.append(f"{protocol}: no logprob for some probe tokens")
            continue
        second = await scorer.score(probe_ids)
        noise = _noise(first, second)
        log.info("teacher probe: %s tokenizer, scoring protocol %s, teacher noise %.4g nats/token",
                 "same" if same else "another", protocol, noise)  # fmt: skip
        if noise > endpoint.max_noise:
            raise ConfigError(
                f"{where(endpoint)} scored the same probe twice {noise:.4g} nats/token apart on average, above "
                f"max_noise = {endpoint.max_noise:g}: its scores are noisier than the signal on-policy distillation "
                f"learns from (replicas or batch-dependent kernels that disagree). Pin one replica / deterministic "
                f"kernels, or raise [orchestrator.teacher_model] max_noise if you accept it"
            )
        return TeacherProbe(same, protocol, noise, None if same or side is not None else teacher, side)
    hint = (" llama.cpp's llama-server returns logprobs of generated tokens only, never of given ones: serve the "
            "teacher with vLLM or `apprentice serve` for scoring, and keep llama-server for the teacher's template "
            "and tokens with [orchestrator.teacher_model] tokenizer = \"<its URL>\" if you like" if llama_scores else "")
    raise ConfigError(
        f"{where(endpoint)} cannot score prompts on its completions API with scoring = {endpoint.scoring!r} "
        f"({'; '.join(failures)}). On-policy distillation needs vLLM's prompt_logprobs or the legacy echo + logprobs "
        f"(vLLM, `apprentice serve`, some hosted completions APIs).{hint}"
    )
