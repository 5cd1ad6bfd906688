"""Inference: the built-in OpenAI-compatible server (`apprentice serve`) and its batching engine."""
