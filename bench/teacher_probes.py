"""The teacher-side reliability probes of docs/reliability.md, against whichever apprentice is importable.

    HF_HUB_OFFLINE=1 PYTHONPATH=src python bench/teacher_probes.py            # this checkout's client
    HF_HUB_OFFLINE=1 PYTHONPATH=OLD/src python bench/teacher_probes.py        # another checkout, same probes

Each probe starts the loopback fault teacher (tests/integration/fault_teacher.py), sends one request with
timeout_s = 5 and max_tokens = 32, and prints the time taken, the peak Python memory (tracemalloc) and what the
client did. A probe that would wait longer than its limit is stopped and reported as still waiting.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))
from fault_teacher import Fault, FaultTeacher  # noqa: E402

from apprentice.clients.openai_client import OpenAIChatClient  # noqa: E402
from apprentice.config import EndpointConfig, SamplingConfig  # noqa: E402

HELLO = [{"role": "user", "content": "hello"}]
BROKEN_CALL = [
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c0", "type": "function", "function": {"name": "calculator", "arguments": "{expression: 2+2"}}]},
    {"role": "tool", "tool_call_id": "c0", "content": "Error: the arguments are not valid JSON"},
]  # fmt: skip


def probe(name: str, faults: list[Fault], *, max_retries: int = 0, limit_s: float = 20.0, provider: str = "openai",
          messages: list[dict[str, Any]] = HELLO) -> None:  # fmt: skip
    with FaultTeacher(provider=provider) as teacher:
        teacher.push(*faults)
        endpoint = EndpointConfig(base_url=teacher.base_url, model="m", timeout_s=5.0, max_retries=max_retries)
        client = OpenAIChatClient(endpoint, SamplingConfig(max_tokens=32), max_concurrency=1, use_token_client=False,
                                  cache_dir=Path(tempfile.mkdtemp()), backoff_base_s=0.01, backoff_max_s=0.05)  # fmt: skip

        async def go() -> Any:
            try:
                return await asyncio.wait_for(client.chat(messages, key="k"), limit_s)
            finally:
                await client.aclose()

        tracemalloc.start()
        start = time.monotonic()
        try:
            r = asyncio.run(go())
            outcome = f"returned: finish={r.finish_reason}, {len(r.message.get('content') or '')} chars, {len(r.message.get('tool_calls') or [])} tool calls"
        except TimeoutError:
            outcome = f"still waiting after {limit_s:.0f} s (stopped by the probe)"
        except Exception as e:  # the point is to report whatever the client does
            outcome = f"{type(e).__name__}({getattr(e, 'kind', '')}): {str(e)[:100]}"
        elapsed = time.monotonic() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        print(f"{name:30s} {elapsed:6.2f} s  peak {peak / 2**20:6.1f} MiB  {len(teacher.chat_requests())} req  {outcome}", flush=True)


def main() -> None:
    probe("lone surrogate", [Fault.reply({"content": "ab\ud800cd"})])
    probe("invalid UTF-8", [Fault.raw(b'{"choices":[{"index":0,"finish_reason":"stop","message":{"role":"assistant","content":"ab\xffcd"}}]}')])
    probe("50 MB answer", [Fault.huge(50_000_000)])
    probe("2 MB answer (max_tokens 32)", [Fault.huge(2_000_000)])
    probe("4076 tokens, no finish_reason", [Fault.reply(usage={"prompt_tokens": 3, "completion_tokens": 4076}, finish_reason="")])
    probe("1 byte / 2 s (timeout_s 5)", [Fault.drip(2.0)], limit_s=30.0)
    probe("429 Retry-After 10 days", [Fault.rate_limit(retry_after=864_000)], max_retries=1, limit_s=10.0)
    probe("401", [Fault("status", status=401, message="bad key")])
    probe("llama.cpp: non-JSON args sent", [], provider="llama.cpp", messages=BROKEN_CALL, max_retries=2)
    probe("llama.cpp: empty after reasoning", [Fault.reply({"content": ""})], provider="llama.cpp")


if __name__ == "__main__":
    main()
