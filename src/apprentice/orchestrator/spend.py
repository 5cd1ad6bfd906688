"""Teacher usage accounting and the optional spend cap (`max_tokens_total` / `price` + `max_cost`).

A run pays at most one endpoint: the teacher that writes the answers (`orchestrator.rollout_model`, distill mode)
or the teacher that scores the student's samples (`orchestrator.teacher_model`, on-policy distillation). Every
paid response adds its usage to a ledger; cache hits are free. Distill mode charges it per chat answer
(orchestrator/metered.py); the scoring clients' sessions charge it per answer received (clients/session.py).
The ledger is the run's cumulative total, kept in OUTPUT/orchestrator/usage.json (written durably after every
step and when the orchestrator stops), so a resumed attempt counts what earlier attempts paid. Once the total
reaches a cap, no new request is sent (`SpendCapReached`); the orchestrator writes the steps whose rollouts are
all done and exits with `EXIT_SPEND_CAP`. Raising the cap and rerunning resumes: answers paid before the stop
come from the cache.

A kill -9 loses at most the usage of the responses since the last step was written (the ledger then undercounts
by that much; those answers are cached and not paid again).
"""

from __future__ import annotations

import json
from pathlib import Path

from apprentice import fsio
from apprentice.clients.base import Usage
from apprentice.config import EndpointConfig
from apprentice.errors import ApprenticeError

EXIT_SPEND_CAP = 3
"""Exit code of the orchestrator and of `apprentice distill` when a spend cap stopped the run."""


class SpendCapReached(ApprenticeError):
    """The teacher spend cap is reached: no new request is sent; the run stops after its last complete step."""

    exit_code = EXIT_SPEND_CAP


class SpendLedger:
    """The run's cumulative teacher usage against the endpoint's caps."""

    def __init__(self, path: Path, endpoint: EndpointConfig | None, section: str = "orchestrator.rollout_model") -> None:
        self.path = path
        self.endpoint = endpoint
        self.section = section
        """The config section of the paid endpoint, named in the cap messages."""
        self.total = read_ledger(path)

    def cost(self, usage: Usage | None = None) -> float | None:
        """Cost of `usage` (default: the run's total) under the price table, or None without one."""
        price = self.endpoint.price if self.endpoint is not None else None
        if price is None:
            return None
        usage = usage or self.total
        return (usage.prompt_tokens * price.prompt_per_mtok + usage.completion_tokens * price.completion_per_mtok) / 1e6

    def add(self, usage: Usage) -> None:
        self.total = self.total + usage

    def check(self) -> None:
        """`SpendCapReached` once a cap is reached (the `Budget` of a session whose requests this ledger pays)."""
        if (reason := self.exhausted()) is not None:
            raise SpendCapReached(reason)

    def exhausted(self) -> str | None:
        """Which cap is reached, as a message for the user, or None while there is budget left."""
        endpoint = self.endpoint
        if endpoint is None:
            return None
        if endpoint.max_tokens_total is not None and self.total.total_tokens >= endpoint.max_tokens_total:
            return (
                f"the teacher spend cap is reached: {self.total.total_tokens} tokens paid >= "
                f"{self.section}.max_tokens_total = {endpoint.max_tokens_total}"
            )
        cost = self.cost()
        if endpoint.max_cost is not None and cost is not None and cost >= endpoint.max_cost:
            return f"the teacher spend cap is reached: cost {cost:.4f} >= {self.section}.max_cost = {endpoint.max_cost}"
        return None

    def save(self) -> None:
        fsio.write_text(self.path, json.dumps(self.total.as_dict() | {"cost": self.cost()}))

    def metrics(self) -> dict[str, float]:
        """Run totals: `teacher/usage_total/*` (and the cost so far when there is a price table)."""
        out = self.total.metrics("teacher/usage_total")
        cost = self.cost()
        if cost is not None:
            out["teacher/usage_total/cost"] = cost
        return out


def read_ledger(path: Path) -> Usage:
    """The usage stored at `path` (none yet: zero); an ApprenticeError naming the file when it is damaged, since a
    negative or garbled count would quietly move the cap."""
    if not path.is_file():
        return Usage()

    def corrupt(problem: str) -> ApprenticeError:
        return ApprenticeError(f"{path}: corrupt usage ledger ({problem}); fix or delete it (the run's spend so far is "
                               f"then counted from zero)")  # fmt: skip

    try:
        stored = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise corrupt(str(e)) from None
    if not isinstance(stored, dict):
        raise corrupt(f"not a JSON object but {type(stored).__name__}")
    counts = {k: v for k, v in stored.items() if k in Usage.__dataclass_fields__}
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise corrupt(f"{name} = {value!r} is not a count of tokens")
    return Usage(**counts)
