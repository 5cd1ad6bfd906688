"""Environments: datasets of tasks, rollouts (possibly multi-turn with tools) and reward functions."""
