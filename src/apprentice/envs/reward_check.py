"""Rewards are checked where they enter: a finite real number, or the rollout is set aside with a counted kind.

A reward is what an environment's (often user-written) scoring code returned. A NaN or an infinity would make the
group advantages of every sample beside it non-finite and the trainer's loss with them; a string such as "0.5"
is a bug in the reward function that `float()` would hide. So the orchestrator (`orchestrator/batch.py`
`rollout_one`) sets such a rollout aside (`rollout/set_aside/<kind>`), and nothing of it is written into a batch:

    reward_type    not a real number (bool and int are accepted; a str, None, a list, a tensor are not)
    reward_nan     NaN
    reward_inf     +inf or -inf (or an int too large for a float)
    reward_error   the reward function raised (environments score inside `reward_function(...)`)

Environments written by users can wrap their own scoring the same way:

    with reward_function("my_env.score"):
        reward = score(answer, task)
"""

from __future__ import annotations

import math
import numbers
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

REWARD_KINDS = ("reward_type", "reward_nan", "reward_inf", "reward_error")


class RewardError(Exception):
    """One sample's reward cannot be used: `kind` is one of REWARD_KINDS, the message says what was returned or
    raised (and where)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def checked_reward(value: Any, where: str = "reward") -> float:
    """`value` as a float when it is a finite real number (bool, int, float, numpy scalars); else RewardError."""
    if isinstance(value, str | bytes) or not isinstance(value, numbers.Real):
        raise RewardError(
            "reward_type",
            f"{where} returned {value!r} ({type(value).__name__}); a reward must be a real number (float, int or bool)",
        )
    try:
        reward = float(value)
    except OverflowError:
        raise RewardError("reward_inf", f"{where} returned an int too large for a float: {value}") from None
    if math.isnan(reward):
        raise RewardError("reward_nan", f"{where} returned NaN")
    if math.isinf(reward):
        raise RewardError("reward_inf", f"{where} returned {reward}")
    return reward


def describe_exception(error: BaseException) -> str:
    """One line: the exception's type and message, and the innermost frame it was raised in (file:line)."""
    frames = traceback.extract_tb(error.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}{where}" if text else f"{type(error).__name__}{where}"


@contextmanager
def reward_function(name: str) -> Iterator[None]:
    """Any exception raised inside (sync or async scoring code) becomes RewardError("reward_error") naming `name`."""
    try:
        yield
    except RewardError:
        raise
    except Exception as e:
        raise RewardError("reward_error", f"reward function {name} raised {describe_exception(e)}") from e
