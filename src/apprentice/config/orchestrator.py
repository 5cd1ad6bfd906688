"""`[orchestrator]` and its sub-sections: who samples rollouts, how, and from which environments."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from apprentice.config.base import Section
from apprentice.config.secrets import find_secret, looks_like_credential, url_secret_problem
from apprentice.crosstok.align import Spread

_ENV_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_USE_ENV = (
    "Put the key in an environment variable and name it with api_key_var (sent as 'Authorization: Bearer ...')"
)


class TokenPrice(Section):
    """What an endpoint charges, per million tokens (any currency; `max_cost` uses the same one)."""

    prompt_per_mtok: float = Field(ge=0.0)
    """Price of one million prompt (input) tokens."""
    completion_per_mtok: float = Field(ge=0.0)
    """Price of one million completion (output) tokens, reasoning tokens included."""


def checked_url(key: str, url: str, example: str, hint: str = "") -> str:
    """`url` without its trailing slash; a ValueError naming `key` when it carries a credential (checked first and
    never echoed: a URL is written to OUTPUT/config.toml and printed in errors) or is no http(s) URL."""
    problem = url_secret_problem(url)
    if problem is not None:
        raise ValueError(f"{key} must not carry a credential, but {problem}{hint}")
    if not re.match(r"^https?://[^/\s]+", url):
        raise ValueError(f"{key} must be an http(s) URL like '{example}'")
    return url.rstrip("/")


class EndpointConfig(Section):
    """An OpenAI-compatible chat endpoint. The API key is read from an environment variable at request time."""

    base_url: str
    """Base URL of the OpenAI-compatible API, e.g. "https://api.openai.com/v1" or "http://127.0.0.1:8000/v1"."""
    model: str = Field(min_length=1)
    """Model name sent with every request."""
    api_key_var: str | None = None
    """Name of the environment variable holding the API key (never the key itself); None sends no key."""
    headers: dict[str, str] = Field(default_factory=dict)
    """Extra HTTP headers sent with every request (no secrets here: this is written to OUTPUT/config.toml)."""
    timeout_s: float = Field(default=120.0, gt=0.0)
    """Per-request timeout in seconds."""
    max_retries: int = Field(default=5, ge=0, le=100)
    """Retries on 429, 5xx, timeouts and connection errors (exponential backoff with jitter)."""
    max_requests_per_s: float | None = Field(default=None, gt=0.0)
    """Client-side request-rate limit; None means unlimited (bounded only by max_concurrency)."""
    max_retry_after_s: float = Field(default=300.0, ge=0.0)
    """Longest wait a 429's Retry-After may impose before a retry; a longer one gives the request up (counted as
    `teacher/errors/rate_limit`) instead of stalling the run. Waits over 5 s are logged."""
    max_response_bytes: int | None = Field(default=None, ge=1024)
    """Largest response body read; a bigger one is cut off and set aside (`oversized`). None: 4 MiB plus 1 KiB
    per sampling.max_tokens, ample for any answer within max_tokens (logprobs included)."""
    prompt_cache_key: bool = False
    """Send `prompt_cache_key` (a hash of the conversation's first user turn and what precedes it) so a provider
    with prompt caching routes the samples and turns of one prompt together. Off: the field is not sent."""
    user: str | None = Field(default=None, min_length=1, max_length=64)
    """A stable tag sent as the request's `user` field (e.g. "apprentice-distill"); None sends no `user`."""
    max_tokens_total: int | None = Field(default=None, ge=1)
    """Spend cap: once this endpoint has been paid this many tokens over the whole run (prompt + completion,
    reasoning included; resumed attempts included, from OUTPUT/orchestrator/usage.json), the run stops cleanly
    after its last complete step (exit code 3). Raise it and rerun to resume. None: no token cap."""
    price: TokenPrice | None = None
    """Price table of this endpoint's model, for `teacher/usage/cost` and `max_cost`."""
    max_cost: float | None = Field(default=None, gt=0.0)
    """Spend cap in the price table's currency, counted like max_tokens_total; needs `price`."""

    @model_validator(mode="after")
    def _cost_cap_needs_price(self) -> EndpointConfig:
        if self.max_cost is not None and self.price is None:
            raise ValueError(
                "max_cost needs a price table: add price = { prompt_per_mtok = ..., completion_per_mtok = ... } "
                "(the endpoint's prices per million tokens)"
            )
        return self

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        return checked_url("base_url", url, "http://127.0.0.1:8000/v1", hint=f". {_USE_ENV}")

    @field_validator("headers")
    @classmethod
    def _no_secret_headers(cls, headers: dict[str, str]) -> dict[str, str]:
        # Headers are written to OUTPUT/config.toml; a credential there would leak. Values are never echoed, and a
        # credential-looking value is refused whatever its header is called ("X-Auth: Bearer sk-...").
        for name, value in headers.items():
            lowered = name.lower()
            if looks_like_credential(name):
                raise ValueError(f"a header name looks like a credential; secrets must not go in the config. {_USE_ENV}")
            if lowered in ("authorization", "cookie", "proxy-authorization") or any(w in lowered for w in ("key", "token", "secret", "password")):
                raise ValueError(
                    f"header {name!r} looks like a credential; headers are written to OUTPUT/config.toml, so "
                    f"secrets must not go there. {_USE_ENV}"
                )
            if looks_like_credential(value):
                raise ValueError(
                    f"the value of header {name!r} looks like a credential (a key, 'Bearer ...' or a long random "
                    f"token); headers are written to OUTPUT/config.toml, so secrets must not go there. {_USE_ENV}"
                )
        return headers

    @field_validator("api_key_var")
    @classmethod
    def _env_var_name(cls, name: str | None) -> str | None:
        # Never echo the value: a user who pasted the key itself here must not see it printed back.
        if name is not None and (not _ENV_VAR_NAME.match(name) or looks_like_credential(name)):
            raise ValueError(
                "api_key_var must be the NAME of an environment variable (letters, digits, underscores), "
                "e.g. api_key_var = \"OPENAI_API_KEY\"; put the key itself in that variable, never in the config"
            )
        return name


class TeacherEndpointConfig(EndpointConfig):
    """`[orchestrator.teacher_model]`: an endpoint that scores the student's text (on-policy distillation). Its
    tokenizer may differ from the student's: the completion text is then scored after the conversation in the
    teacher's own chat template and compared chunk by chunk on shared byte boundaries (apprentice.crosstok)."""

    tokenizer: str | None = None
    """The teacher's tokenizer and chat template, needed when it differs from the student's and the endpoint
    cannot tokenize with its template: a Hugging Face directory, an already cached hub id, or the http(s) URL of
    a server that serves them (vLLM's POST /tokenize or llama.cpp's llama-server /apply-template + /tokenize, e.g.
    "http://127.0.0.1:8080" running the teacher's GGUF; no API key is sent to it). None: `model` when that is a
    local directory; otherwise the endpoint's own tokenizer or the student's token ids found at the endpoint."""
    scoring: Literal["auto", "prompt_logprobs", "echo"] = "auto"
    """How the teacher scores a token sequence: vLLM's `prompt_logprobs` on the completions API, or the legacy
    completions `echo: true` + `logprobs` (OpenAI's shape, served by several hosted providers). "auto" probes
    prompt_logprobs first, then echo, once at startup."""
    max_noise: float = Field(default=0.1, ge=0.0)
    """Largest accepted teacher noise: at startup the teacher scores one probe twice and the mean absolute
    difference of its per-token logprobs (nats) is logged as `distill/teacher_noise`; above this the run stops
    (replicas that disagree by more than the signal would train on noise)."""
    spread: Spread = "even"
    """A teacher with another tokenizer: how the value of a chunk (a stretch of text both tokenizations cut at
    the same bytes; value = teacher minus student logprob of it) is shared among its student tokens. "even":
    equal shares; "last" / "first": all on the chunk's last / first token; "surprisal": in proportion to each
    token's -logprob under the student. Every rule keeps the per-sample sum (teacher minus student logprob of the
    completion); they differ only on chunks of several student tokens (`distill/multi_token_chunks` is their
    share of the tokens). docs/distillation.md compares them."""
    use_endpoint_tokenize: bool = True
    """A teacher with another tokenizer: build its side of each turn (its chat template, its tokens of the
    student's text) over a tokenizing server when one answers (the endpoint's or `tokenizer`'s POST /tokenize:
    vLLM, `apprentice serve`; llama-server's /apply-template + /tokenize). false: always from a local
    `tokenizer` (one request per turn instead of two or three; the local copy must be what the server serves)."""

    @model_validator(mode="after")
    def _no_chat_tags(self) -> TeacherEndpointConfig:
        tags = [k for k, off in (("prompt_cache_key", False), ("user", None)) if getattr(self, k) != off]
        if tags:
            raise ValueError(
                f"{' and '.join(tags)} would be ignored here: they tag chat requests, and the teacher_model scores "
                "on the completions API, where they are not sent. Remove them from [orchestrator.teacher_model]."
            )
        return self

    @model_validator(mode="after")
    def _local_side_needs_tokenizer(self) -> TeacherEndpointConfig:
        if not self.use_endpoint_tokenize and (self.tokenizer is None or self.tokenizer_url is not None):
            raise ValueError("use_endpoint_tokenize = false needs the teacher's tokenizer locally: set tokenizer = "
                             "\"<HF directory or cached hub id of the teacher>\" (not a server URL)")  # fmt: skip
        return self

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer_url(cls, tokenizer: str | None) -> str | None:
        if tokenizer is not None and re.match(r"^https?://", tokenizer):  # a server, not a directory or hub id
            return checked_url("tokenizer", tokenizer, "http://127.0.0.1:8080")
        return tokenizer

    @property
    def tokenizer_url(self) -> str | None:
        """`tokenizer` when it names a server (http or https URL), else None."""
        return self.tokenizer if self.tokenizer is not None and re.match(r"^https?://", self.tokenizer) else None


class SamplingConfig(Section):
    """Sampling arguments. Only fields every OpenAI-compatible API accepts are sent to a teacher, and a field
    left unset is not sent at all (the server's default applies)."""

    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    """Sampling temperature. Unset: not sent to a teacher, whose default applies (1.0 on OpenAI-style APIs; vLLM
    uses the model's generation_config); the token client (rl mode) always sends it, 1.0 when unset, because
    the trainer's importance ratios assume untempered sampling. Reasoning APIs accept only their default."""
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    """Nucleus sampling threshold. Unset: not sent to a teacher (server default); 1.0 for the token client."""
    max_tokens: int = Field(default=512, ge=1)
    """Maximum tokens generated per assistant turn (the teacher's reasoning included)."""
    max_tokens_field: Literal["max_tokens", "max_completion_tokens"] = "max_tokens"
    """The request field that carries max_tokens: OpenAI's reasoning models refuse "max_tokens" and want
    "max_completion_tokens"; most other servers (vLLM, llama.cpp, DeepSeek) read "max_tokens"."""
    max_tokens_tolerance: float = Field(default=0.25, ge=0.0, le=10.0)
    """A teacher answer longer than max_tokens * (1 + tolerance) tokens (by the response's usage, or by its text
    at 32 characters per token) ignored max_tokens: it is set aside as `oversized`, never rendered or cached."""
    stop: list[str] | None = None
    """Stop strings."""
    seed: int | None = None
    """Per-request sampling seed, for endpoints that support it."""
    top_logprobs: int = Field(default=0, ge=0, le=20)
    """Distill mode: ask the teacher's chat endpoint for `logprobs: true, top_logprobs: k` (OpenAI's maximum is 20)
    and train on its top-k distribution at every position where the teacher's tokens map one to one onto the
    student's (soft targets, trainer.loss.type = "distill"; elsewhere the plain NLL). 0: neither field is sent."""
    extra_body: dict[str, Any] = Field(default_factory=dict)
    """Extra request fields sent as-is (only for servers that accept them; hosted APIs may reject unknown fields).
    No credentials: it is written to OUTPUT/config.toml and into every teacher cache entry."""

    @field_validator("extra_body")
    @classmethod
    def _no_secret_in_extra_body(cls, extra_body: dict[str, Any]) -> dict[str, Any]:
        where = find_secret(extra_body)
        if where is not None:  # the path names keys only, never the value
            raise ValueError(
                f"extra_body.{where} looks like a credential (a key-like name or value); extra_body is sent with "
                f"every request and written to OUTPUT/config.toml and every teacher cache entry. {_USE_ENV}"
            )
        return extra_body


class EnvConfig(Section):
    id: str = Field(min_length=1)
    """A built-in environment ("prompts", "reverse-text", "tool-calculator") or an import path "pkg.module:factory"."""
    args: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of the environment's factory."""
    weight: float = Field(default=1.0, gt=0.0)
    """Relative share of each batch drawn from this environment."""

    @field_validator("args")
    @classmethod
    def _no_secret_in_args(cls, args: dict[str, Any]) -> dict[str, Any]:
        # Names only: argument values are arbitrary data (paths, prompts), but `api_key = "..."` is a credential.
        where = find_secret(args, check_values=False)
        if where is not None:
            raise ValueError(
                f"args.{where} is named like a credential; env args are written to OUTPUT/config.toml. Let the "
                "environment read the secret from an environment variable instead (pass the variable's name)"
            )
        return args


class OnPolicyDistillConfig(Section):
    """How on-policy distillation (`[orchestrator.teacher_model]` in rl mode) mixes its two learning signals.

    Per completion token t of a student sample: advantage_t = kl_coef * (teacher_lp_t - student_lp_t)
    + reward_coef * A, where student_lp_t is the student's sampling logprob, teacher_lp_t the teacher's logprob of
    the same token after the same prefix, and A the sample's group-relative reward advantage (rl mode's). The
    first term is minus the per-token reverse KL: the student is pushed toward tokens the teacher rates higher
    than it does. kl_coef = 1, reward_coef = 0 is pure distillation; kl_coef = 0 is plain RL; both add up. With a
    teacher of another tokenizer, teacher_lp_t - student_lp_t is the token's share of the teacher-minus-student
    log-ratio of its byte-aligned chunk of text (apprentice.crosstok).
    """

    kl_coef: float = Field(default=1.0, ge=0.0, le=1e3)
    """Weight of the teacher term (teacher logprob minus student logprob) in every token's advantage."""
    reward_coef: float = Field(default=0.0, ge=0.0, le=1e3)
    """Weight of the environment reward's group advantage in every token's advantage (0: reward only logged)."""
    top_k: int = Field(default=0, ge=0, le=20)
    """0: the teacher scores the sampled token only (the one-sample reverse-KL estimate above, rl loss). k > 0: the
    scoring request asks for `prompt_logprobs = k` and the run trains with trainer.loss.type = "distill" on the
    teacher's top-k distribution at every completion position (kl_coef and reward_coef then do not apply). vLLM
    returns at most its --max-logprobs (20 by default) and `apprentice serve` 20: checked once at startup."""

    @model_validator(mode="after")
    def _some_signal(self) -> OnPolicyDistillConfig:
        if self.kl_coef == 0.0 and self.reward_coef == 0.0:
            raise ValueError(
                "orchestrator.on_policy_distill.kl_coef and reward_coef are both 0, so every advantage would be 0 "
                "and the student would learn nothing; set kl_coef = 1 (distillation) and/or reward_coef > 0"
            )
        return self


class OrchestratorConfig(Section):
    batch_size: int = Field(default=8, ge=1)
    """Rollouts per training step (tasks x rollouts_per_prompt)."""
    rollouts_per_prompt: int = Field(default=1, ge=1)
    """Samples per task; several per task give group baselines in rl mode."""
    max_concurrency: int = Field(default=32, ge=1)
    """Maximum requests in flight to the rollout endpoint."""
    max_async_level: int = Field(default=2, ge=0)
    """How many steps the orchestrator may run ahead of the trainer's last finished step (backpressure)."""
    max_off_policy_steps: int = Field(default=8, ge=0)
    """rl mode: discard rollouts generated by a policy older than this many steps."""
    advantage: Literal["group", "reward"] = "group"
    """rl mode: "group" = reward minus the mean reward of the task's rollouts_per_prompt samples (needs
    rollouts_per_prompt >= 2); "reward" = the raw reward (no baseline)."""
    advantage_std_norm: bool = False
    """rl mode, group advantages: also divide by the group's reward standard deviation (GRPO); off = Dr. GRPO."""
    skip_zero_advantage: bool = False
    """rl mode: leave out groups whose rewards are all equal (they carry no learning signal, only cost compute).
    They are counted in `rollout/zero_advantage_groups` either way."""
    eval_interval: int = Field(default=0, ge=0)
    """rl mode: every this many steps (and after the last) score the current policy on the environments' eval
    tasks through the inference server, logged as `eval/*`; 0 disables."""
    eval_num_tasks: int | None = Field(default=None, ge=1)
    """Eval tasks per environment of the held-out evaluation, rl mode's and `apprentice eval`'s (None: all)."""
    eval_temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    """Sampling temperature of the held-out evaluation, rl mode's and `apprentice eval`'s (0 = greedy: a low-noise
    score of the policy)."""
    use_token_client: bool = True
    """Ask the server for token ids and logprobs (local inference only); must be false with a teacher endpoint."""
    seed: int = 0
    """Seed of task sampling (deterministic, resumable order)."""
    reasoning: Literal["keep", "drop"] = "keep"
    """Teacher reasoning (`reasoning_content` / think blocks): "keep" trains on it as generated; "drop" trains on
    the answer only (for APIs that hide or summarise reasoning)."""
    allow_control_tokens: bool = False
    """Keep rollouts whose teacher text contains special tokens of the student's tokenizer (e.g. `<|im_end|>`,
    `<|im_start|>system`). Off by default: training on them teaches the student to emit control tokens (prompt
    injection into the training data); such rollouts are set aside as render/set_aside/control_token."""
    tool_call_arguments: Literal["dict", "string"] = "dict"
    """How the student's serving engine hands tool-call `arguments` to its chat template, so that training renders
    what inference renders: "dict" (vLLM, SGLang) parses the JSON string into an object first, and the template
    prints it its own way (`{"condition": true}`); "string" (llama.cpp) passes the string as the teacher wrote it
    (`{"condition":true}`) where the template prints strings as it prints the object (or takes strings only), and
    the object elsewhere."""
    rollout_model: EndpointConfig | None = None
    """The teacher endpoint. Setting it selects distill mode (external rollouts, SFT loss)."""
    truncated: Literal["drop", "keep"] = "keep"
    """Turns cut off by max_tokens: "drop" sets the rollout aside; "keep" trains on the truncated text (without an
    end-of-turn token: the model never emitted one). Default: "keep" in rl mode (a rambling answer is a
    low-reward sample the policy must learn from; a random or verbose first policy would otherwise have every
    rollout set aside), "drop" in distill mode (a teacher's cut-off answer is not one to imitate). Resolved in
    one place, `_truncated_default_follows_the_mode` below; `--dry-run` and OUTPUT/config.toml show the value."""
    student_endpoint: EndpointConfig | None = None
    """rl mode without an [inference] section: an already running server of the student to sample from."""
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    """Sampling arguments."""
    teacher_model: TeacherEndpointConfig | None = None
    """rl mode: a teacher endpoint that scores the student's samples (on-policy distillation). It must score
    prompts on its completions API (vLLM's prompt_logprobs or the legacy echo + logprobs: vLLM, `apprentice serve`,
    some hosted APIs); its tokenizer may differ from the student's (see TeacherEndpointConfig.tokenizer)."""
    on_policy_distill: OnPolicyDistillConfig | None = None
    """With teacher_model: the mix of teacher signal and reward (default kl_coef = 1, reward_coef = 0)."""
    env: list[EnvConfig] = Field(default_factory=lambda: [EnvConfig(id="reverse-text")], min_length=1)
    """Environments, as [[orchestrator.env]] tables."""

    @model_validator(mode="before")
    @classmethod
    def _truncated_default_follows_the_mode(cls, data: Any) -> Any:
        """The one place the mode-dependent default of `truncated` is decided, from this section's own input:
        "drop" with a rollout_model (distill mode), else "keep". A value the user gave is never changed."""
        if isinstance(data, dict) and "truncated" not in data:
            data = {**data, "truncated": "drop" if data.get("rollout_model") is not None else "keep"}
        return data

    @model_validator(mode="after")
    def _whole_groups(self) -> OrchestratorConfig:
        if self.batch_size % self.rollouts_per_prompt:
            raise ValueError(
                f"orchestrator.batch_size ({self.batch_size}) must be a multiple of orchestrator.rollouts_per_prompt "
                f"({self.rollouts_per_prompt}): each step holds whole groups of samples of the same task"
            )
        return self

    @model_validator(mode="after")
    def _student_endpoint_is_not_paid(self) -> OrchestratorConfig:
        caps = [k for k in ("max_tokens_total", "price", "max_cost") if self.student_endpoint is not None
                and getattr(self.student_endpoint, k) is not None]  # fmt: skip
        if caps:
            raise ValueError(
                f"orchestrator.student_endpoint sets {', '.join(caps)}, which would be ignored: the student's own "
                "server is never charged. Spend caps bound a paid teacher: [orchestrator.rollout_model] (distill "
                "mode) or [orchestrator.teacher_model] (on-policy distillation). Remove them from student_endpoint."
            )
        return self

    @property
    def tasks_per_step(self) -> int:
        return self.batch_size // self.rollouts_per_prompt
