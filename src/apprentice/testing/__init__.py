"""Offline models and tokenizers for tests, benchmarks and the demo (nothing here touches a model hub)."""
