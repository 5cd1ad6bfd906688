"""Teacher usage accounting and spend caps: what a response costs, when a cap is reached, what survives a restart."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from apprentice.clients.base import ChatResponse
from apprentice.config import EndpointConfig
from apprentice.errors import ApprenticeError
from apprentice.orchestrator.metered import MeteredClient, StepAccount, current_account
from apprentice.orchestrator.spend import SpendCapReached, SpendLedger, Usage


def endpoint(**caps: Any) -> EndpointConfig:
    return EndpointConfig(base_url="http://127.0.0.1:1/v1", model="teacher", **caps)


def test_usage_reads_reasoning_tokens_where_providers_put_them() -> None:
    openai_style = {"prompt_tokens": 10, "completion_tokens": 50, "completion_tokens_details": {"reasoning_tokens": 30}}
    assert Usage.from_openai(openai_style) == Usage(10, 50, 30)
    assert Usage.from_openai({"prompt_tokens": 3, "completion_tokens": 4, "reasoning_tokens": 2}) == Usage(3, 4, 2)
    assert Usage.from_openai({"prompt_tokens": None, "completion_tokens_details": None}) == Usage(0, 0, 0)


def test_token_and_cost_caps(tmp_path: Path) -> None:
    ledger = SpendLedger(tmp_path / "usage.json", endpoint(max_tokens_total=100))
    ledger.add(Usage(60, 39))
    assert ledger.exhausted() is None
    ledger.add(Usage(0, 1))
    assert "max_tokens_total = 100" in (ledger.exhausted() or "")

    price = {"prompt_per_mtok": 1.0, "completion_per_mtok": 4.0}
    ledger = SpendLedger(tmp_path / "cost.json", endpoint(price=price, max_cost=0.001))
    ledger.add(Usage(200, 199))  # 200 * 1e-6 + 199 * 4e-6 = 0.000996
    assert ledger.cost() == pytest.approx(0.000996) and ledger.exhausted() is None
    ledger.add(Usage(0, 1))
    assert "max_cost = 0.001" in (ledger.exhausted() or "")
    assert ledger.metrics()["teacher/usage_total/cost"] == pytest.approx(0.001)


def test_a_cost_cap_without_prices_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="max_cost needs a price table"):
        endpoint(max_cost=5.0)


def test_the_ledger_survives_a_restart_and_a_raised_cap_reopens_it(tmp_path: Path) -> None:
    path = tmp_path / "orchestrator" / "usage.json"
    ledger = SpendLedger(path, endpoint(max_tokens_total=10))
    ledger.add(Usage(8, 4, 1))
    ledger.save()
    again = SpendLedger(path, endpoint(max_tokens_total=10))
    assert again.total == Usage(8, 4, 1) and again.exhausted() is not None
    assert SpendLedger(path, endpoint(max_tokens_total=1000)).exhausted() is None

    path.write_text("{not json")
    with pytest.raises(ApprenticeError, match="corrupt usage ledger"):
        SpendLedger(path, endpoint())


class CountingTeacher:
    """The counters-only view of today's client: cumulative token counters, no per-response usage."""

    def __init__(self) -> None:
        self.counters: dict[str, float] = {}

    async def chat(self, messages: list[dict[str, Any]], *, tools: Any = None, key: str = "") -> ChatResponse:
        await asyncio.sleep(0.01 * len(key))  # answers finish out of order
        if key.startswith("cached"):
            return ChatResponse({"role": "assistant", "content": "x"}, "stop", cached=True)
        self.counters["teacher/prompt_tokens"] = self.counters.get("teacher/prompt_tokens", 0.0) + len(key)
        self.counters["teacher/completion_tokens"] = self.counters.get("teacher/completion_tokens", 0.0) + 1
        return ChatResponse({"role": "assistant", "content": "x"}, "stop")

    def metrics(self, reset: bool = False) -> dict[str, float]:
        out = dict(self.counters)
        if reset:
            self.counters.clear()
        return out

    async def aclose(self) -> None:
        pass


def test_concurrent_responses_are_charged_to_their_own_step_and_the_cap_refuses_new_requests(tmp_path: Path) -> None:
    ledger = SpendLedger(tmp_path / "usage.json", endpoint(max_tokens_total=40))
    client = MeteredClient(CountingTeacher(), ledger)
    accounts = {name: StepAccount() for name in ("a", "b")}

    async def rollout(account: str, key: str) -> None:
        current_account.set(accounts[account])
        await client.chat([], key=key)

    async def drive() -> None:
        await asyncio.gather(rollout("a", "xxxxx"), rollout("b", "xx"), rollout("a", "x"), rollout("b", "cached-b"))
        client.metrics(reset=True)  # the loop resets the client's counters every step; charging must not mind
        await asyncio.gather(rollout("b", "x" * 12), rollout("a", "x" * 20))
        with pytest.raises(SpendCapReached, match="max_tokens_total = 40"):
            await client.chat([], key="one more")

    asyncio.run(drive())
    assert accounts["a"].usage == Usage(5 + 1 + 20, 3) and accounts["b"].usage == Usage(2 + 12, 2)
    assert accounts["b"].cache_hits == 1 and accounts["b"].responses == 3
    assert ledger.total.total_tokens == 26 + 3 + 14 + 2 >= 40
    assert client.meter.count == 0


def test_a_response_that_carries_its_own_usage_is_charged_by_it(tmp_path: Path) -> None:
    """Clients that attach the provider's `usage` to each response (reasoning tokens included) are read as is."""

    class UsageTeacher(CountingTeacher):
        async def chat(self, messages: list[dict[str, Any]], *, tools: Any = None, key: str = "") -> ChatResponse:
            response = ChatResponse({"role": "assistant", "content": "x"}, "stop")
            response.usage = {"prompt_tokens": 7, "completion_tokens": 9, "completion_tokens_details": {"reasoning_tokens": 5}}  # type: ignore[attr-defined]
            return response

    ledger = SpendLedger(tmp_path / "usage.json", endpoint())
    account = StepAccount()

    async def drive() -> None:
        current_account.set(account)
        await MeteredClient(UsageTeacher(), ledger).chat([], key="k")

    asyncio.run(drive())
    assert account.usage == ledger.total == Usage(7, 9, 5)
    assert account.metrics()["teacher/usage/reasoning_tokens"] == 5.0
