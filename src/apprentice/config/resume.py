"""Refuse to resume a run directory with a config that would make it a different run.

Resuming continues the same data stream and the same training state; changing what defines them (the student,
the teacher model, the environments, the sampling, the batch shape, the loss) in the middle would silently mix
two runs in one output directory. Operational settings (max_steps, learning-rate schedule, timeouts,
concurrency, the teacher's URL, logging) may change between attempts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from apprentice.config.load import ConfigError, load_config
from apprentice.config.root import Config

IDENTITY_KEYS = (
    "seed",
    "model.name",
    "model.tokenizer",
    "model.gguf_file",
    "orchestrator.batch_size",
    "orchestrator.rollouts_per_prompt",
    "orchestrator.seed",
    "orchestrator.reasoning",
    "orchestrator.advantage",
    "orchestrator.advantage_std_norm",
    "orchestrator.truncated",
    "orchestrator.rollout_model.model",
    "orchestrator.teacher_model.model",
    "orchestrator.on_policy_distill",
    "orchestrator.sampling",
    "orchestrator.env",
    "trainer.loss",
    "trainer.num_processes",
    "trainer.num_nodes",
)
"""Dotted prefixes of the keys that define a run; a resumed run must keep them."""


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def changed_identity_keys(previous: Config, current: Config) -> list[str]:
    """Dotted keys under IDENTITY_KEYS whose values differ between two configs."""
    old = _flatten(previous.model_dump(mode="json"))
    new = _flatten(current.model_dump(mode="json"))
    keys = sorted(set(old) | set(new))
    in_scope = [k for k in keys if any(k == p or k.startswith(f"{p}.") for p in IDENTITY_KEYS)]
    return [k for k in in_scope if old.get(k) != new.get(k)]


def check_resumable(cfg: Config) -> bool:
    """True when OUTPUT holds a run (its config.toml and some step of it on disk) that `cfg` may resume; ConfigError
    when it would be another run. A config.toml alone (an attempt that failed before writing any step, e.g. on a
    missing data file or a wrong model name) is no run: the corrected config replaces it."""
    saved = Path(cfg.output_dir) / "config.toml"
    if not saved.is_file() or not holds_run_state(Path(cfg.output_dir)):
        return False
    changed = changed_identity_keys(load_config([saved]), cfg)
    if changed:
        raise ConfigError(
            f"{cfg.output_dir} already holds a run whose config differs in {', '.join(changed)}; resuming would mix "
            f"two runs in one directory. Use a new output_dir (--output_dir runs/NEW), or delete {cfg.output_dir} "
            f"to start over (its saved config is {saved})."
        )
    return True


def holds_run_state(output_dir: Path) -> bool:
    """Whether a run wrote anything it would resume from: a step batch, a checkpoint or published weights (complete
    or not: a partial one means a run got that far)."""
    return any(any((output_dir / kind).glob("step_*")) for kind in ("rollouts", "checkpoints", "weights"))
