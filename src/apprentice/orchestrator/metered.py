"""The orchestrator's view of its rollout client: requests in flight over time, usage per step, the spend cap.

`MeteredClient` wraps the run's client (same `chat` signature, so environments cannot tell). It

  - integrates the number of `chat` calls in flight over time (`InflightMeter`): the time-averaged value over a
    step interval is `teacher/inflight_mean`, and over a run divided by max_concurrency, the busy fraction;
  - charges each response's usage to the step whose rollout asked for it (a context variable set by the
    producer per rollout task), and to the run's `SpendLedger`; cache hits are free;
  - refuses new requests once the ledger reports a cap reached (`SpendCapReached`).

Usage per response: the typed `ChatResponse.usage` the client attaches to every paid response (and to the
`ClientError` of an answer it set aside); a cache hit costs nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol

from apprentice.clients.base import ChatResponse, ClientError, Usage
from apprentice.orchestrator.spend import SpendLedger


class CountingClient(Protocol):
    """The rollout client as the orchestrator uses it (OpenAIChatClient satisfies it)."""

    async def chat(
        self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None, key: str = ""
    ) -> ChatResponse: ...

    def metrics(self, reset: bool = False) -> dict[str, float]: ...

    async def aclose(self) -> None: ...


@dataclass
class StepAccount:
    """What the rollouts of one step cost: their responses, cache hits and paid usage."""

    responses: int = 0
    cache_hits: int = 0
    usage: Usage = field(default_factory=Usage)

    def metrics(self) -> dict[str, float]:
        out = {"teacher/responses": float(self.responses), "teacher/cache_hits": float(self.cache_hits)}
        out.update(self.usage.metrics("teacher/usage"))
        return out


current_account: ContextVar[StepAccount | None] = ContextVar("current_account", default=None)
"""The account of the step whose rollout is running in this task (set by the producer per rollout task)."""


class InflightMeter:
    """The time integral of a count (requests in flight), so any interval's time average is two reads away."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.count = 0
        self._area = 0.0
        self._since = clock()

    def change(self, delta: int) -> None:
        now = self.clock()
        self._area += self.count * (now - self._since)
        self._since = now
        self.count += delta

    def area(self) -> tuple[float, float]:
        """(integral of the count so far, now): the mean over [t0, t1] is (area1 - area0) / (t1 - t0)."""
        now = self.clock()
        return self._area + self.count * (now - self._since), now


class MeteredClient:
    """A `ChatClient` that meters requests in flight, charges usage per step and enforces the spend cap."""

    def __init__(self, inner: CountingClient, ledger: SpendLedger | None = None) -> None:
        self.inner = inner
        self.ledger = ledger
        self.meter = InflightMeter()

    async def chat(
        self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None, key: str = ""
    ) -> ChatResponse:
        if self.ledger is not None:
            self.ledger.check()  # SpendCapReached once a cap is reached
        self.meter.change(+1)
        try:
            response = await self.inner.chat(messages, tools=tools, key=key)
        except ClientError as e:
            # An answer set aside by the client (empty, oversized, invalid text) was still paid for: charge it.
            if e.usage is not None:
                self._charge(e.usage)
            raise
        finally:
            self.meter.change(-1)
        if not response.cached and response.usage is not None:
            self._charge(response.usage)
        account = current_account.get()
        if account is not None:
            account.responses += 1
            account.cache_hits += int(response.cached)
        return response

    def _charge(self, usage: Usage) -> None:
        if self.ledger is not None:
            self.ledger.add(usage)
        account = current_account.get()
        if account is not None:
            account.usage = account.usage + usage

    def metrics(self, reset: bool = False) -> dict[str, float]:
        """The wrapped client's counters (since the previous reset: interval semantics)."""
        return self.inner.metrics(reset=reset)

    async def aclose(self) -> None:
        await self.inner.aclose()
