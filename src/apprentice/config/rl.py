"""Rules an rl-mode run needs beyond the config's own validation (checked by `apprentice rl` and the
orchestrator, also under --dry-run).

They live here rather than in `Config`'s validator because a config may be valid for other commands (a
trainer alone, `apprentice eval`) and only an rl *run* needs them.
"""

from __future__ import annotations

from apprentice.config.load import ConfigError
from apprentice.config.root import Config


def check_rl_config(cfg: Config) -> None:
    """ConfigError naming the keys and the fix when `cfg` cannot run as an RL loop."""
    orch = cfg.orchestrator
    if cfg.mode != "rl":
        raise ConfigError("an rl run needs an rl-mode config: remove [orchestrator.rollout_model] and add [inference]")
    if cfg.trainer.loss.type == "rl" and not orch.use_token_client:
        raise ConfigError(
            'trainer.loss.type = "rl" needs the inference logprobs of every sampled token, so '
            "orchestrator.use_token_client must be true in rl mode (set `use_token_client = true` under [orchestrator])"
        )
    # Pure on-policy distillation (reward_coef = 0) learns from the teacher's per-token scores alone: no groups needed.
    pure_distill = orch.teacher_model is not None and (orch.on_policy_distill is None or orch.on_policy_distill.reward_coef == 0)
    if orch.advantage == "group" and orch.rollouts_per_prompt < 2 and not pure_distill:
        raise ConfigError(
            f'orchestrator.advantage = "group" compares each sample with the other samples of its task, but '
            f"orchestrator.rollouts_per_prompt = {orch.rollouts_per_prompt}: every advantage would be 0 and nothing "
            f'would be learned. Set rollouts_per_prompt >= 2 (e.g. 8, with batch_size a multiple of it), or '
            f'advantage = "reward" for the raw reward without a baseline'
        )


def weight_broadcast(cfg: Config) -> str:
    """How weights reach the server in this run: trainer.weight_broadcast with "auto" resolved ("collective"
    with the builtin server the run starts, "filesystem" otherwise: with vLLM the receive pauses its sampling
    for as long as the wire takes, and that trade was never measured on a GPU here)."""
    choice = cfg.trainer.weight_broadcast
    if choice != "auto":
        return choice
    return "collective" if cfg.mode == "rl" and cfg.inference is not None and cfg.inference.backend == "builtin" else "filesystem"
