"""Teacher usage accounting and the optional spend cap (`rollout_model.max_tokens_total` / `price` + `max_cost`).

Every paid response adds its usage to a ledger; cache hits are free. The ledger is the run's cumulative total,
kept in OUTPUT/orchestrator/usage.json (written durably after every step and when the orchestrator stops), so
a resumed attempt counts what earlier attempts paid. Once the total reaches a cap, no new request is sent
(`SpendCapReached`); the orchestrator writes the steps whose rollouts are all done and exits with
`EXIT_SPEND_CAP`. Raising the cap and rerunning resumes: answers paid before the stop come from the cache.

A kill -9 loses at most the usage of the responses since the last step was written (the ledger then undercounts
by that much; those answers are cached and not paid again).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from apprentice import fsio
from apprentice.config import EndpointConfig
from apprentice.errors import ApprenticeError

EXIT_SPEND_CAP = 3
"""Exit code of the orchestrator and of `apprentice distill` when a spend cap stopped the run."""


class SpendCapReached(ApprenticeError):
    """The teacher spend cap is reached: no new request is sent; the run stops after its last complete step."""

    exit_code = EXIT_SPEND_CAP


@dataclass
class Usage:
    """Tokens a teacher charged for (OpenAI `usage` semantics: reasoning tokens are part of completion tokens)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0

    @classmethod
    def from_openai(cls, usage: dict[str, Any]) -> Usage:
        """A response's `usage` object; reasoning tokens from `completion_tokens_details` (OpenAI) or top level."""
        details = usage.get("completion_tokens_details") or {}
        reasoning = details.get("reasoning_tokens") if isinstance(details, dict) else None
        return cls(
            int(usage.get("prompt_tokens") or 0),
            int(usage.get("completion_tokens") or 0),
            int(reasoning or usage.get("reasoning_tokens") or 0),
        )

    def add(self, other: Usage) -> None:
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.reasoning_tokens += other.reasoning_tokens

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}/{name}": float(value) for name, value in asdict(self).items()}


class SpendLedger:
    """The run's cumulative teacher usage against the endpoint's caps."""

    def __init__(self, path: Path, endpoint: EndpointConfig | None) -> None:
        self.path = path
        self.endpoint = endpoint
        self.total = Usage()
        if path.is_file():
            try:
                self.total = Usage(**{k: int(v) for k, v in json.loads(path.read_text()).items() if k in asdict(Usage())})
            except (ValueError, TypeError) as e:
                raise ApprenticeError(
                    f"{path}: corrupt usage ledger ({e}); fix or delete it (the run's spend so far is then counted "
                    f"from zero)"
                ) from None

    def cost(self, usage: Usage | None = None) -> float | None:
        """Cost of `usage` (default: the run's total) under the price table, or None without one."""
        price = self.endpoint.price if self.endpoint is not None else None
        if price is None:
            return None
        usage = usage or self.total
        return (usage.prompt_tokens * price.prompt_per_mtok + usage.completion_tokens * price.completion_per_mtok) / 1e6

    def add(self, usage: Usage) -> None:
        self.total.add(usage)

    def exhausted(self) -> str | None:
        """Which cap is reached, as a message for the user, or None while there is budget left."""
        endpoint = self.endpoint
        if endpoint is None:
            return None
        if endpoint.max_tokens_total is not None and self.total.total_tokens >= endpoint.max_tokens_total:
            return (
                f"the teacher spend cap is reached: {self.total.total_tokens} tokens paid >= "
                f"orchestrator.rollout_model.max_tokens_total = {endpoint.max_tokens_total}"
            )
        cost = self.cost()
        if endpoint.max_cost is not None and cost is not None and cost >= endpoint.max_cost:
            return f"the teacher spend cap is reached: cost {cost:.4f} >= orchestrator.rollout_model.max_cost = {endpoint.max_cost}"
        return None

    def save(self) -> None:
        fsio.write_text(self.path, json.dumps(asdict(self.total) | {"cost": self.cost()}))

    def metrics(self) -> dict[str, float]:
        """Run totals: `teacher/usage_total/*` (and the cost so far when there is a price table)."""
        out = self.total.metrics("teacher/usage_total")
        cost = self.cost()
        if cost is not None:
            out["teacher/usage_total/cost"] = cost
        return out
