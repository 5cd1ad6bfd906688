"""Config files and snippets shared by the config and CLI tests."""

from pathlib import Path

MINIMAL = Path(__file__).resolve().parents[2] / "configs" / "distill-minimal.toml"
"""The minimal distill config of the foundation issue."""

RL_CONFIG = """
[model]
name = "student"
[inference]
port = 8123
"""
"""A minimal valid rl-mode config."""
