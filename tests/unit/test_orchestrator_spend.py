"""Teacher usage accounting and spend caps: what a response costs, when a cap is reached, what survives a restart."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from apprentice.clients.base import ChatResponse, ClientError, Usage
from apprentice.config import EndpointConfig
from apprentice.errors import ApprenticeError
from apprentice.orchestrator.metered import MeteredClient, StepAccount, current_account
from apprentice.orchestrator.spend import SpendCapReached, SpendLedger


def endpoint(**caps: Any) -> EndpointConfig:
    return EndpointConfig(base_url="http://127.0.0.1:1/v1", model="teacher", **caps)


def test_usage_reads_the_details_providers_send_and_adds_up() -> None:
    openai_style = {"prompt_tokens": 10, "completion_tokens": 50, "completion_tokens_details": {"reasoning_tokens": 30},
                    "prompt_tokens_details": {"cached_tokens": 4}}  # fmt: skip
    assert Usage.from_json(openai_style) == Usage(10, 50, 30, 4)
    assert Usage.from_json({"prompt_tokens": None, "completion_tokens_details": None}) == Usage(0, 0, 0)
    assert Usage(1, 2, 1) + Usage(10, 20, 5, 3) == Usage(11, 22, 6, 3) and Usage(11, 22).total_tokens == 33


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

    for damaged in ("{not json", "[]", '"x"', '{"prompt_tokens": Infinity}', '{"prompt_tokens": -5000000}',
                    '{"completion_tokens": 1.5}', '{"prompt_tokens": true}'):  # fmt: skip
        path.write_text(damaged)  # a negative count would quietly push the cap back: refused like the rest
        with pytest.raises(ApprenticeError, match=rf"{path}: corrupt usage ledger .*fix or delete it"):
            SpendLedger(path, endpoint(max_tokens_total=10))
    path.write_text('{"prompt_tokens": 3, "completion_tokens": 4, "cost": 0.5}')  # as `save` writes it
    assert SpendLedger(path, endpoint()).total == Usage(3, 4)


def test_a_usage_count_that_is_not_a_finite_number_counts_as_zero() -> None:
    """Python's json reads 1e999 as inf: int(inf) raised OverflowError out of the client and stopped the run."""
    assert Usage.from_json({"prompt_tokens": float("inf"), "completion_tokens": 3}) == Usage(0, 3)
    assert Usage.from_json({"prompt_tokens": float("nan"), "completion_tokens": -2}) == Usage()


class Teacher:
    """A client as the orchestrator sees it: each paid response carries its typed usage (prompt tokens = the
    key's length, 1 completion token); keys starting with "cached" are cache hits, "empty" an answer set aside."""

    async def chat(self, messages: list[dict[str, Any]], *, tools: Any = None, key: str = "") -> ChatResponse:
        await asyncio.sleep(0.01 * len(key))  # answers finish out of order
        if key.startswith("cached"):  # what the answer once cost rides along; a cache hit is not paid again
            return ChatResponse({"role": "assistant", "content": "x"}, "stop", cached=True, usage=Usage(99, 99))
        if key.startswith("empty"):
            raise ClientError("empty", "the answer was empty", Usage(len(key), 7, 7))
        return ChatResponse({"role": "assistant", "content": "x"}, "stop", usage=Usage(len(key), 1))

    def metrics(self, reset: bool = False) -> dict[str, float]:
        return {}

    async def aclose(self) -> None:
        pass


def test_concurrent_responses_are_charged_to_their_own_step_and_the_cap_refuses_new_requests(tmp_path: Path) -> None:
    ledger = SpendLedger(tmp_path / "usage.json", endpoint(max_tokens_total=50))
    client = MeteredClient(Teacher(), ledger)
    accounts = {name: StepAccount() for name in ("a", "b")}

    async def rollout(account: str, key: str) -> None:
        current_account.set(accounts[account])
        try:
            await client.chat([], key=key)
        except ClientError:
            pass

    async def drive() -> None:
        await asyncio.gather(rollout("a", "xxxxx"), rollout("b", "xx"), rollout("a", "x"), rollout("b", "cached-b"))
        await asyncio.gather(rollout("b", "x" * 12), rollout("a", "x" * 20), rollout("b", "empty"))
        with pytest.raises(SpendCapReached, match="max_tokens_total = 50"):
            await client.chat([], key="one more")

    asyncio.run(drive())
    assert accounts["a"].usage == Usage(5 + 1 + 20, 3) and accounts["b"].usage == Usage(2 + 12 + 5, 2 + 7, 7)
    assert accounts["b"].cache_hits == 1 and accounts["b"].responses == 3  # the set-aside answer is no response
    assert ledger.total.total_tokens == 29 + 28 >= 50
    assert accounts["b"].metrics()["teacher/usage/reasoning_tokens"] == 7.0
    assert client.meter.count == 0
