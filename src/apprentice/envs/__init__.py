"""Environments: datasets of tasks, rollouts (possibly multi-turn with tools) and reward functions."""

from apprentice.envs.base import EnvError, Environment, Split, Task
from apprentice.envs.registry import BUILTINS, load_environment

__all__ = ["BUILTINS", "EnvError", "Environment", "Split", "Task", "load_environment"]
