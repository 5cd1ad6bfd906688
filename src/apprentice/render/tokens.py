"""Token path: build samples from the ids an inference server returned, without re-tokenizing anything.

Each step carries `tokens = {"prompt_ids", "completion_ids", "completion_logprobs"}`. A step whose prompt_ids
start with the current sample's ids extends it: the new prompt tokens (tool results, user turns) are added with
mask False and logprob 0.0, then the completion with mask True and its logprobs. Otherwise a new sample starts.
"""

from __future__ import annotations

from typing import Any

from apprentice.render.errors import RenderError
from apprentice.types import TrainingSample


def _step_tokens(step: dict[str, Any], s: int) -> tuple[list[int], list[int], list[float]]:
    tokens = step["tokens"]
    try:
        prompt = [int(t) for t in tokens["prompt_ids"]]
        completion = [int(t) for t in tokens["completion_ids"]]
        logprobs = [float(x) for x in tokens["completion_logprobs"]]
    except (KeyError, TypeError, ValueError) as err:
        raise RenderError(
            "bad_tokens", f"step {s}: tokens need prompt_ids, completion_ids, completion_logprobs ({err!r})"
        ) from err
    if len(logprobs) != len(completion):
        raise RenderError(
            "bad_tokens",
            f"step {s}: {len(completion)} completion_ids but {len(logprobs)} completion_logprobs",
        )
    if not completion:
        raise RenderError("empty_mask", f"step {s}: the server returned no completion tokens")
    return prompt, completion, logprobs


def render_tokens(steps: list[dict[str, Any]], advantage: float = 1.0) -> list[TrainingSample]:
    if not steps:
        raise RenderError("no_turns", "the trajectory has no steps")
    samples: list[TrainingSample] = []
    ids: list[int] = []
    mask: list[bool] = []
    logprobs: list[float] = []
    for s, step in enumerate(steps):
        prompt, completion, completion_lp = _step_tokens(step, s)
        if ids and prompt[: len(ids)] == ids:
            new = prompt[len(ids) :]
        else:
            if ids:
                samples.append(TrainingSample(ids, mask, logprobs, advantage))
            ids, mask, logprobs, new = [], [], [], prompt
        ids.extend(new + completion)
        mask.extend([False] * len(new) + [True] * len(completion))
        logprobs.extend([0.0] * len(new) + completion_lp)
    samples.append(TrainingSample(ids, mask, logprobs, advantage))
    return samples
