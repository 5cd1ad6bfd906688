"""Every example under configs/ is a valid config: it loads, passes the mode rules, and names real environments."""

from __future__ import annotations

from pathlib import Path

import pytest

from apprentice.cli import check_environments
from apprentice.config import load_config
from apprentice.config.rl import check_rl_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").rglob("*.toml"))


def test_there_are_examples() -> None:
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_config_is_valid(path: Path) -> None:
    cfg = load_config([path])
    check_environments(cfg)
    if path.name.startswith(("rl-", "opd-")):
        check_rl_config(cfg)  # what `apprentice rl` checks before starting anything
        assert cfg.mode == "rl"
    else:
        assert cfg.mode == "distill"
    assert path.read_text().lstrip().startswith("#"), "an example opens with a comment saying what it runs"
