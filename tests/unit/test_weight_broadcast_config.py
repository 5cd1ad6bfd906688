"""`trainer.weight_broadcast`: what "auto" resolves to, and collective updates to vLLM."""

from __future__ import annotations

from pathlib import Path

from apprentice.config import Config, load_config
from apprentice.config.rl import check_rl_config, weight_broadcast


def config(tmp_path: Path, server: str, *overrides: str) -> Config:
    path = tmp_path / "rl.toml"
    path.write_text(f"""
output_dir = "{tmp_path / 'out'}"
[model]
name = "m"
[orchestrator]
rollouts_per_prompt = 4
[[orchestrator.env]]
id = "reverse-text"
{server}
""")
    return load_config([path], list(overrides))


BUILTIN = "[inference]\nport = 8001"
VLLM = '[inference]\nbackend = "vllm"'
ENDPOINT = '[orchestrator.student_endpoint]\nbase_url = "http://127.0.0.1:9/v1"\nmodel = "m"'


def test_auto_is_collective_with_the_builtin_server_the_run_starts_and_filesystem_otherwise(tmp_path: Path) -> None:
    assert weight_broadcast(config(tmp_path, BUILTIN)) == "collective"
    assert weight_broadcast(config(tmp_path, VLLM)) == "filesystem"
    assert weight_broadcast(config(tmp_path, ENDPOINT)) == "filesystem"
    assert weight_broadcast(config(tmp_path, BUILTIN, "--trainer.weight_broadcast", "filesystem")) == "filesystem"
    assert weight_broadcast(config(tmp_path, ENDPOINT, "--trainer.weight_broadcast", "collective")) == "collective"


def test_collective_updates_to_vllm_are_accepted_and_go_through_its_worker_extension(tmp_path: Path) -> None:
    from apprentice.trainer.broadcast import weight_sender

    cfg = config(tmp_path, VLLM, "--trainer.weight_broadcast", "collective")
    check_rl_config(cfg)
    assert weight_broadcast(cfg) == "collective"
    sender = weight_sender(cfg)
    assert sender is not None and sender.server == "vllm"
