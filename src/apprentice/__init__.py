"""apprentice: distill any OpenAI-compatible chat endpoint into a student model, or train it with on-policy RL."""

__version__ = "0.1.0"
