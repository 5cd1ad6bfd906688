"""Config rules of on-policy distillation: `[orchestrator.teacher_model]` in rl mode."""

from __future__ import annotations

from pathlib import Path

import pytest
from config_samples import RL_CONFIG

from apprentice.config import ConfigError, load_config

TEACHER = """
[orchestrator.teacher_model]
base_url = "http://127.0.0.1:8001/v1"
model = "teacher"
"""


def load(tmp_path: Path, text: str, overrides: list[str] | None = None):  # type: ignore[no-untyped-def]
    path = tmp_path / "run.toml"
    path.write_text(text)
    return load_config([path], overrides or [])


def error_of(tmp_path: Path, text: str, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text, overrides)
    return str(info.value)


def test_teacher_model_in_rl_mode_defaults_to_pure_distillation(tmp_path: Path) -> None:
    cfg = load(tmp_path, RL_CONFIG + TEACHER)
    assert cfg.mode == "rl" and cfg.orchestrator.teacher_model is not None
    assert cfg.orchestrator.teacher_model.model == "teacher"
    assert cfg.orchestrator.on_policy_distill is None  # None means the defaults below
    mixed = load(tmp_path, RL_CONFIG + TEACHER + "[orchestrator.on_policy_distill]\nkl_coef = 0.5\nreward_coef = 2.0\n")
    assert mixed.orchestrator.on_policy_distill is not None
    assert (mixed.orchestrator.on_policy_distill.kl_coef, mixed.orchestrator.on_policy_distill.reward_coef) == (0.5, 2.0)


def test_teacher_model_and_rollout_model_together_is_an_error(tmp_path: Path) -> None:
    text = """
[model]
name = "student"
[orchestrator]
use_token_client = false
[orchestrator.rollout_model]
base_url = "http://127.0.0.1:8000/v1"
model = "t"
[trainer.loss]
type = "sft"
""" + TEACHER
    message = error_of(tmp_path, text)
    assert "orchestrator.teacher_model" in message and "orchestrator.rollout_model" in message
    assert "Who samples must be unambiguous" in message


def test_both_samplers_fire_first_whatever_else_the_config_holds(tmp_path: Path) -> None:
    """An rl config ([inference], token client, rl loss) given a rollout_model too: the first message must be the
    one naming both keys, not the distill-mode rules about [inference] / use_token_client / loss."""
    rollout = '[orchestrator.rollout_model]\nbase_url = "http://127.0.0.1:8000/v1"\nmodel = "t"\n'
    message = error_of(tmp_path, RL_CONFIG + TEACHER + rollout)
    assert "orchestrator.teacher_model and orchestrator.rollout_model are both set" in message
    assert "[inference]" not in message and "use_token_client" not in message and "sft" not in message


def test_teacher_model_needs_the_rl_loss_and_the_token_client(tmp_path: Path) -> None:
    message = error_of(tmp_path, RL_CONFIG + TEACHER + '[trainer.loss]\ntype = "sft"\n')
    assert 'trainer.loss.type must be "rl"' in message and "--trainer.loss.type rl" in message
    message = error_of(tmp_path, RL_CONFIG + TEACHER, ["--orchestrator.use_token_client", "false"])
    assert "use_token_client must be true" in message


def test_mix_without_teacher_and_an_all_zero_mix_are_errors(tmp_path: Path) -> None:
    message = error_of(tmp_path, RL_CONFIG + "[orchestrator.on_policy_distill]\nkl_coef = 1.0\n")
    assert "[orchestrator.teacher_model] is not" in message
    message = error_of(tmp_path, RL_CONFIG + TEACHER + "[orchestrator.on_policy_distill]\nkl_coef = 0.0\n")
    assert "kl_coef and reward_coef are both 0" in message
    message = error_of(tmp_path, RL_CONFIG + TEACHER + "[orchestrator.on_policy_distill]\nkl_coeff = 1.0\n")
    assert "kl_coeff" in message  # unknown keys are errors


def test_resuming_with_another_teacher_or_mix_is_refused(tmp_path: Path) -> None:
    from apprentice.config import write_resolved
    from apprentice.config.resume import check_resumable

    out = ["--output_dir", str(tmp_path / "run")]
    write_resolved(load(tmp_path, RL_CONFIG + TEACHER, out))
    (tmp_path / "run" / "weights" / "step_1").mkdir(parents=True)  # the run got as far as one step
    moved = load(tmp_path, RL_CONFIG + TEACHER, [*out, "--orchestrator.teacher_model.base_url", "http://10.0.0.2:8000/v1"])
    assert check_resumable(moved) is True  # the same teacher on another host: operational
    other = load(tmp_path, RL_CONFIG + TEACHER + "[orchestrator.on_policy_distill]\nreward_coef = 1.0\n",
                 [*out, "--orchestrator.teacher_model.model", "bigger-teacher"])  # fmt: skip
    with pytest.raises(ConfigError) as info:
        check_resumable(other)
    assert "orchestrator.teacher_model.model" in str(info.value) and "orchestrator.on_policy_distill" in str(info.value)


def test_teacher_tokenizer_may_name_a_server_by_url(tmp_path: Path) -> None:
    cfg = load(tmp_path, RL_CONFIG + TEACHER + 'tokenizer = "http://127.0.0.1:8080/"\n')
    teacher = cfg.orchestrator.teacher_model
    assert teacher is not None and teacher.tokenizer_url == "http://127.0.0.1:8080"
    local = load(tmp_path, RL_CONFIG + TEACHER + 'tokenizer = "Qwen/Qwen2.5-0.5B-Instruct"\n').orchestrator.teacher_model
    assert local is not None and local.tokenizer_url is None
    message = error_of(tmp_path, RL_CONFIG + TEACHER + 'tokenizer = "http://me:hunter2@127.0.0.1:8080"\n')
    assert "tokenizer must not carry a credential" in message and "hunter2" not in message


def test_spread_rule_and_local_teacher_side_are_config_fields(tmp_path: Path) -> None:
    cfg = load(tmp_path, RL_CONFIG + TEACHER)
    assert cfg.orchestrator.teacher_model is not None
    assert cfg.orchestrator.teacher_model.spread == "even" and cfg.orchestrator.teacher_model.use_endpoint_tokenize
    chosen = load(tmp_path, RL_CONFIG + TEACHER, ["--orchestrator.teacher_model.spread", "surprisal"])
    assert chosen.orchestrator.teacher_model is not None and chosen.orchestrator.teacher_model.spread == "surprisal"
    message = error_of(tmp_path, RL_CONFIG + TEACHER + 'spread = "middle"\n')
    assert "spread" in message and "'even'" in message
    message = error_of(tmp_path, RL_CONFIG + TEACHER + "use_endpoint_tokenize = false\n")
    assert "use_endpoint_tokenize = false needs the teacher's tokenizer locally: set tokenizer" in message
    local = load(tmp_path, RL_CONFIG + TEACHER + 'use_endpoint_tokenize = false\ntokenizer = "/models/teacher"\n')
    assert local.orchestrator.teacher_model is not None and not local.orchestrator.teacher_model.use_endpoint_tokenize



@pytest.mark.parametrize("line", ['user = "apprentice"', "prompt_cache_key = true"])
def test_chat_tags_on_the_scoring_teacher_are_refused_not_ignored(tmp_path: Path, line: str) -> None:
    message = error_of(tmp_path, RL_CONFIG + TEACHER + line + "\n")
    assert line.split(" ")[0] in message and "completions API" in message and "teacher_model" in message
