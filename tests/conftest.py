"""Test-wide settings: nothing may reach a model hub (tests build or ship every model they use)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# CI runs property tests on a fixed sequence of examples, so a green main stays green; local runs keep exploring
# new random examples (and hypothesis' database replays any failure they find).
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
