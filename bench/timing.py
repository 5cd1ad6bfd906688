"""Wall-clock timing shared by the benchmarks (run as `python bench/NAME.py`, so this imports as `timing`)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds `fn()` takes, with the device's queued work finished before and after (CUDA runs async)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start
