"""Helpers shared by the render tests."""

from typing import Any

from apprentice.types import TrainingSample


def masked_texts(tok: Any, sample: TrainingSample) -> list[str]:
    """The decoded runs of masked tokens, in order."""
    runs: list[list[int]] = []
    for i, (tid, m) in enumerate(zip(sample.token_ids, sample.loss_mask, strict=True)):
        if m:
            if i == 0 or not sample.loss_mask[i - 1]:
                runs.append([])
            runs[-1].append(tid)
    return [tok.decode(run) for run in runs]
