"""The whole run: every section plus the cross-section mode rules of DESIGN.md section 2.

Validators here only check; they never rewrite another section. Each rule's message names the keys involved
and says how to fix the config.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from apprentice.config.base import Section
from apprentice.config.inference import InferenceConfig
from apprentice.config.model import ModelConfig
from apprentice.config.orchestrator import OrchestratorConfig
from apprentice.config.trainer import TrainerConfig


class LogConfig(Section):
    level: str = Field(default="INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")
    """Console log level."""
    wandb_project: str | None = None
    """Also log metrics to this Weights & Biases project (needs the `wandb` extra); None logs JSONL only."""
    wandb_name: str | None = None
    """Run name in Weights & Biases."""
    progress: bool = True
    """Show progress bars on the console."""


RL_ONLY_KEYS = {
    "orchestrator": ("max_off_policy_steps", "advantage", "advantage_std_norm", "skip_zero_advantage", "eval_interval"),
    "trainer": ("weights_keep", "weight_broadcast"),
}  # fmt: skip
"""Per section, the keys only rl mode reads (`Config._no_rl_keys_in_distill_mode`)."""


class Config(Section):
    output_dir: Path = Path("runs/default")
    """Where the run writes everything (config.toml, rollouts, checkpoints, final model, metrics, caches)."""
    seed: int = 0
    """Global seed (model init where relevant, data order, sampling)."""
    model: ModelConfig
    """The student."""
    orchestrator: OrchestratorConfig = Field(default_factory=OrchestratorConfig)
    """Rollouts: environments, sampling, the teacher endpoint in distill mode."""
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    """Training: loss, optimizer, checkpoints, parallelism."""
    inference: InferenceConfig | None = None
    """Local inference server (rl mode only); leave out in distill mode."""
    log: LogConfig = Field(default_factory=LogConfig)
    """Logging and metrics."""

    @property
    def mode(self) -> str:
        """"distill" when a teacher endpoint samples the rollouts, else "rl"."""
        return "distill" if self.orchestrator.rollout_model is not None else "rl"

    @model_validator(mode="after")
    def _one_sampler(self) -> Config:
        """Checked before every other rule (validators run in definition order): the other rules assume one mode,
        and their messages would lead a config with both keys from one fix to the next."""
        if self.orchestrator.teacher_model is not None and self.orchestrator.rollout_model is not None:
            raise ValueError(
                "orchestrator.teacher_model and orchestrator.rollout_model are both set: teacher_model selects "
                "on-policy distillation (the student samples, the teacher scores its tokens), rollout_model selects "
                "off-policy distillation (the teacher samples). Who samples must be unambiguous: remove one of them."
            )
        return self

    @model_validator(mode="after")
    def _mode_rules(self) -> Config:
        orch = self.orchestrator
        if orch.rollout_model is not None:
            if self.inference is not None:
                raise ValueError(
                    "orchestrator.rollout_model is set (distill mode: a teacher endpoint samples the rollouts), "
                    "so there must be no [inference] section: the student is never served in distill mode. "
                    "Remove the [inference] section, or remove [orchestrator.rollout_model] for rl mode."
                )
            if orch.use_token_client:
                raise ValueError(
                    "orchestrator.rollout_model is set (distill mode), so orchestrator.use_token_client must be "
                    "false: a teacher endpoint returns text, and token ids/logprobs fields must never be sent "
                    "to it. Set `use_token_client = false` under [orchestrator] "
                    "(or pass --orchestrator.use_token_client false)."
                )
            loss: str = self.trainer.loss.type
            wanted = "distill" if orch.sampling.top_logprobs else "sft"
            if loss != wanted and orch.sampling.top_logprobs:
                raise ValueError(
                    f"orchestrator.sampling.top_logprobs = {orch.sampling.top_logprobs} asks the teacher for its top-k "
                    f'distribution (soft targets), which only trainer.loss.type = "distill" trains on, got "{loss}". '
                    f'Set [trainer.loss] type = "distill", or top_logprobs = 0 for plain SFT on the teacher\'s text.'
                )
            if loss != wanted:
                raise ValueError(
                    f'orchestrator.rollout_model is set (distill mode), so trainer.loss.type must be "sft", '
                    f'got "{loss}": teacher rollouts carry no logprobs of the student, so the rl loss\'s importance '
                    f"ratios exp(trainer_lp - inference_lp) would be meaningless"
                    + (" and the distill loss has no soft targets to learn from. Set orchestrator.sampling."
                       "top_logprobs = k (1..20) for the teacher's top-k, or" if loss == "distill" else ".")
                    + ' add [trainer.loss] type = "sft" (or pass --trainer.loss.type sft).'
                )
            if orch.student_endpoint is not None:
                raise ValueError(
                    "orchestrator.rollout_model and orchestrator.student_endpoint are both set: distill mode "
                    "samples from the teacher only. Remove [orchestrator.student_endpoint]."
                )
        elif orch.sampling.top_logprobs:
            raise ValueError(
                f"orchestrator.sampling.top_logprobs = {orch.sampling.top_logprobs} applies to distill mode (a teacher "
                "at [orchestrator.rollout_model] writes the rollouts); in rl mode the teacher's top-k comes from "
                "[orchestrator.teacher_model] with [orchestrator.on_policy_distill] top_k = k. Remove top_logprobs."
            )
        if self.inference is not None and orch.student_endpoint is not None:
            raise ValueError(
                "[inference] and [orchestrator.student_endpoint] are both set: [inference] starts a server of the "
                "student that nothing would use, since rollouts and weight reloads go to student_endpoint. Keep "
                "[inference] to let apprentice start the server, or student_endpoint for one already running."
            )
        if orch.rollout_model is None and self.inference is None and orch.student_endpoint is None:
            raise ValueError(
                "rl mode (orchestrator.rollout_model is not set) needs somewhere to sample the student: add an "
                "[inference] section (a local server apprentice starts) or [orchestrator.student_endpoint] "
                "(a server already running). To distill from a teacher instead, set "
                "[orchestrator.rollout_model] with use_token_client = false and trainer.loss.type = \"sft\"."
            )
        return self

    @model_validator(mode="after")
    def _no_rl_keys_in_distill_mode(self) -> Config:
        """Keys only rl mode reads, set to anything but their default in distill mode, would be ignored: refused."""
        if self.orchestrator.rollout_model is None:
            return self
        ignored = [f"{name}.{key}" for name, keys in RL_ONLY_KEYS.items() for key in keys
                   if getattr(getattr(self, name), key) != type(getattr(self, name)).model_fields[key].default]  # fmt: skip
        if ignored:
            raise ValueError(
                f"{', '.join(ignored)} apply to rl mode only, and this is distill mode (orchestrator.rollout_model: "
                "a teacher writes the rollouts), where they would be ignored. Remove them. To score a distilled "
                "student on held-out tasks, run `apprentice eval` on OUTPUT/final."
            )
        return self

    @model_validator(mode="after")
    def _on_policy_distill_rules(self) -> Config:
        orch = self.orchestrator
        loss: str = self.trainer.loss.type
        if loss == "distill" and orch.teacher_model is None and orch.rollout_model is None:
            raise ValueError(
                'trainer.loss.type = "distill" has no source of teacher distributions: set [orchestrator.rollout_model] '
                "with [orchestrator.sampling] top_logprobs = k (off-policy: the teacher writes, its top-k are the "
                "targets), or [orchestrator.teacher_model] with [orchestrator.on_policy_distill] top_k = k (on-policy: "
                'the student writes, the teacher scores its top-k); or use type = "sft" / "rl".'
            )
        if orch.teacher_model is None:
            if orch.on_policy_distill is not None:
                raise ValueError(
                    "[orchestrator.on_policy_distill] is set but [orchestrator.teacher_model] is not: the mix of "
                    "teacher signal and reward applies to on-policy distillation only. Add [orchestrator.teacher_model] "
                    "(the endpoint that scores the student's tokens) or remove [orchestrator.on_policy_distill]."
                )
            return self
        top_k = orch.on_policy_distill.top_k if orch.on_policy_distill is not None else 0
        if top_k and loss != "distill":
            raise ValueError(
                f"orchestrator.on_policy_distill.top_k = {top_k} trains on the teacher's top-k distribution at every "
                f'position of the student\'s samples, which trainer.loss.type = "distill" does, got "{loss}". Set '
                f'[trainer.loss] type = "distill", or top_k = 0 for the sampled-token estimator and the rl loss.'
            )
        if not top_k and loss != "rl":
            raise ValueError(
                f'orchestrator.teacher_model is set (on-policy distillation), so trainer.loss.type must be "rl", '
                f'got "{loss}": the teacher\'s per-token scores become advantages of the rl loss'
                + (". For the distill loss, ask for the teacher's top-k: [orchestrator.on_policy_distill] top_k = k "
                   "(1..20)" if loss == "distill" else "")
                + '. Set [trainer.loss] type = "rl" (or pass --trainer.loss.type rl).'
            )
        if top_k and orch.on_policy_distill is not None and orch.on_policy_distill.reward_coef:
            raise ValueError(
                f"orchestrator.on_policy_distill.reward_coef = {orch.on_policy_distill.reward_coef} with top_k = "
                f"{top_k}: the distill loss learns the teacher's distribution and has no reward term, so the reward "
                f"would be silently ignored. Set reward_coef = 0, or top_k = 0 (the rl loss mixes both)."
            )
        if orch.skip_zero_advantage:
            raise ValueError(
                "orchestrator.teacher_model is set (on-policy distillation), so orchestrator.skip_zero_advantage must "
                "be false: a group whose rewards are all equal still carries the teacher's per-token signal. "
                "Set `skip_zero_advantage = false` under [orchestrator]."
            )
        if not orch.use_token_client:
            raise ValueError(
                "orchestrator.teacher_model is set (on-policy distillation), so orchestrator.use_token_client must be "
                "true: the teacher scores the exact token ids the student sampled, against the student's logprobs. "
                "Set `use_token_client = true` under [orchestrator]."
            )
        return self
