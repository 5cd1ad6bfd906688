"""Orchestrator: task scheduling, concurrent rollouts, rendering, packing per rank, hand-off to the trainer."""
