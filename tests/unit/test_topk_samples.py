"""The teacher's top-k targets on TrainingSample: validation, the step-batch columns, packing."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from apprentice.handoff.rollouts import (
    BatchError,
    decode_samples,
    encode_samples,
    rank_file,
    read_step_batch,
    step_batch_has_topk,
    write_step_batch,
)
from apprentice.trainer.packing import collate, pack_samples, placeholder_batch
from apprentice.types import TrainingSample


def topk_sample(t: int, k: int, seed: int, prompt: int = 2) -> TrainingSample:
    """A sample whose loss positions (>= prompt) carry k distinct ids with a normalised-below-1 teacher."""
    rng = random.Random(seed)
    mask = [i >= prompt for i in range(t)]
    ids: list[list[int]] = []
    lps: list[list[float]] = []
    for i in range(t):
        if not mask[i] or rng.random() < 0.2:  # some loss positions without targets too
            ids.append([-1] * k)
            lps.append([0.0] * k)
            continue
        width = rng.randint(1, k)  # fewer than k candidates: -1 padding
        row = rng.sample(range(500), width)
        probs = [rng.random() for _ in row]
        scale = rng.uniform(0.5, 0.99) / sum(probs)
        ids.append(row + [-1] * (k - width))
        lps.append([math.log(p * scale) for p in probs] + [0.0] * (k - width))
    return TrainingSample([rng.randrange(500) for _ in range(t)], mask, [0.0] * t, 1.0, None, ids, lps)


def test_valid_targets_are_accepted_and_report_k() -> None:
    s = topk_sample(12, 4, seed=1)
    assert s.num_topk == 4
    assert TrainingSample([1, 2], [False, True], [0.0, 0.0]).num_topk == 0


@pytest.mark.parametrize(
    ("ids", "lps", "message"),
    [
        ([[-1, -1], [3, 4]], None, "both set or both None"),
        ([[-1, -1]], [[0.0, 0.0]], "one row per token"),
        ([[-1, -1], [3, 4, 5]], [[0.0, 0.0], [-1.0, -1.0, -1.0]], "width k = 2"),
        ([[-1, -1], [3, 4]], [[0.0, 0.0], [-1.0]], "width k = 2"),
        ([[3, -1], [3, 4]], [[-1.0, 0.0], [-1.0, -2.0]], "not in the loss mask"),
        ([[-1, -1], [3, -2]], [[0.0, 0.0], [-1.0, -1.0]], "ids are >= 0"),
        ([[-1, -1], [3, 3]], [[0.0, 0.0], [-1.0, -2.0]], "repeats an id"),
        ([[-1, -1], [3, 4]], [[0.0, 0.0], [-1.0, 0.5]], "finite and <= 0"),
        ([[-1, -1], [3, 4]], [[0.0, 0.0], [-1.0, float("nan")]], "finite and <= 0"),
        ([[-1, -1], [3, 4]], [[0.0, 0.0], [float("-inf"), -1.0]], "finite and <= 0"),
    ],
)
def test_invalid_targets_are_clear_errors(ids: list[list[int]], lps: list[list[float]] | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainingSample([5, 6], [False, True], [0.0, 0.0], 1.0, None, ids, lps)


def test_padding_logprobs_are_ignored() -> None:
    TrainingSample([5, 6], [False, True], [0.0, 0.0], 1.0, None, [[-1, -1], [3, -1]], [[7.0, 0.0], [-1.0, 9.0]])


def mixed_batch() -> list[TrainingSample]:
    return [topk_sample(9, 3, seed=1), TrainingSample([1, 2, 3], [False, True, True], [0.0, -0.5, -0.25]),
            topk_sample(14, 3, seed=2), topk_sample(5, 2, seed=3)]  # fmt: skip


def test_round_trip_of_the_topk_columns() -> None:
    samples = mixed_batch()
    decoded = decode_samples(encode_samples(samples), "mem")
    for before, after in zip(samples, decoded, strict=True):
        if before.teacher_topk_ids is None:
            assert after.teacher_topk_ids is None and after.teacher_topk_logprobs is None
            continue
        assert after.teacher_topk_ids is not None and after.teacher_topk_logprobs is not None
        k = before.num_topk  # a narrower k comes back padded with -1 to the file's k
        assert after.num_topk == 3
        assert [row[:k] for row in after.teacher_topk_ids] == before.teacher_topk_ids
        assert all(row[k:] == [-1] * (3 - k) for row in after.teacher_topk_ids)
        for got, want, id_row in zip(after.teacher_topk_logprobs, before.teacher_topk_logprobs,
                                     before.teacher_topk_ids, strict=True):  # fmt: skip
            valid = [lp for lp, i in zip(want, id_row, strict=True) if i >= 0]
            assert [lp for lp, i in zip(got[:k], id_row, strict=True) if i >= 0] == pytest.approx(valid, abs=1e-6)


def test_files_without_targets_have_no_topk_columns() -> None:
    data = encode_samples([TrainingSample([1, 2], [False, True], [0.0, 0.0])])
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    assert not {"has_topk", "topk_ids", "topk_logprobs"} & set(header)
    assert decode_samples(data, "mem")[0].teacher_topk_ids is None


@pytest.mark.parametrize("column", ["topk_ids", "topk_logprobs", "has_topk"])
def test_corrupt_topk_column_fails_the_checksum(tmp_path: Path, column: str) -> None:
    write_step_batch(tmp_path, 1, [mixed_batch()])
    path = rank_file(tmp_path, 1, 0)
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    start, end = json.loads(data[8 : 8 + header_len])[column]["data_offsets"]
    data[8 + header_len + (start + end) // 2] ^= 0x01  # one bit inside the column: only the sha256 can notice
    path.write_bytes(bytes(data))
    with pytest.raises(BatchError, match="checksum mismatch"):
        read_step_batch(tmp_path, 1, 0)


def test_inconsistent_topk_columns_are_batch_errors() -> None:
    from safetensors.torch import save

    from apprentice.handoff.rollouts import _digest

    tensors = {"lengths": torch.tensor([2]), "advantages": torch.tensor([1.0], dtype=torch.float64),
               "token_ids": torch.tensor([1, 2]), "loss_mask": torch.tensor([False, True]),
               "logprobs": torch.zeros(2), "has_topk": torch.tensor([True]),
               "topk_ids": torch.tensor([[-1, -1], [4, 5]], dtype=torch.int32),
               "topk_logprobs": torch.tensor([[0.0, 0.0], [-1.0, 2.0]])}  # fmt: skip
    with pytest.raises(BatchError, match="sample 0 is invalid: .*finite and <= 0"):
        decode_samples(save(tensors, {"sha256": _digest(tensors)}), "f.safetensors")
    tensors["topk_logprobs"] = torch.zeros(3, 2)
    with pytest.raises(BatchError, match="top-k columns disagree"):
        decode_samples(save(tensors, {"sha256": _digest(tensors)}), "f.safetensors")
    del tensors["topk_logprobs"]
    with pytest.raises(BatchError, match="without"):
        decode_samples(save(tensors, {"sha256": _digest(tensors)}), "f.safetensors")


def test_packing_shifts_targets_with_the_tokens() -> None:
    samples = mixed_batch()
    mb = collate(samples)
    assert mb.teacher_topk_ids is not None and mb.teacher_topk_logprobs is not None
    assert mb.teacher_topk_ids.shape == (1, mb.num_tokens, 3) and mb.teacher_topk_ids.dtype == torch.long
    start = 0
    for s in samples:
        rows = mb.teacher_topk_ids[0, start : start + len(s)].tolist()
        lps = mb.teacher_topk_logprobs[0, start : start + len(s)].tolist()
        if s.teacher_topk_ids is None or s.teacher_topk_logprobs is None:
            assert rows == [[-1] * 3] * len(s)
        else:
            k = s.num_topk
            assert [r[:k] for r in rows[:-1]] == s.teacher_topk_ids[1:]  # position j: the target token j+1
            assert torch.allclose(torch.tensor([r[:k] for r in lps[:-1]]), torch.tensor(s.teacher_topk_logprobs[1:]))
            assert rows[-1] == [-1] * 3  # the last position has no target
        start += len(s)
    # Targets only where the mask trains the target.
    has = (mb.teacher_topk_ids[0] >= 0).any(-1)
    assert not (has & ~mb.loss_mask[0]).any()


def test_packing_without_targets_carries_none() -> None:
    mb = collate([TrainingSample([1, 2, 3], [False, True, True], [0.0] * 3)])
    assert mb.teacher_topk_ids is None and mb.teacher_topk_logprobs is None
    assert placeholder_batch().teacher_topk_ids is None
    rows = pack_samples(mixed_batch(), 16)
    assert sum(mb.num_tokens for mb in rows) == sum(len(s) for s in mixed_batch())
    assert all(mb.teacher_topk_ids is None or mb.teacher_topk_ids.shape[1] == mb.num_tokens for mb in rows)


def test_step_batch_has_topk_looks_at_every_rank(tmp_path: Path) -> None:
    plain = [TrainingSample([1, 2, 3], [False, True, True], [0.0] * 3)]
    write_step_batch(tmp_path, 1, [plain, plain])
    write_step_batch(tmp_path, 2, [plain, [topk_sample(6, 2, seed=4)]])  # only rank 1 got samples with targets
    assert not step_batch_has_topk(tmp_path, 1)
    assert step_batch_has_topk(tmp_path, 2)


def test_shared_prompt_packing_keeps_each_target_with_its_topk_row() -> None:
    """Samples of one prompt packed with a shared prefix: every trained position carries the same target and
    teacher rows as in whole-sample packing."""
    import dataclasses

    base = [topk_sample(12, 3, seed=s, prompt=6) for s in range(3)]
    prompt = base[0].token_ids[:6]
    samples = [dataclasses.replace(s, token_ids=prompt + s.token_ids[6:]) for s in base]
    (whole,) = pack_samples(samples, 64)
    (shared,) = pack_samples(samples, 64, share_prompts=True)
    assert shared.prefix_of is not None and shared.num_shared_tokens == 2 * 5
    for mb in (whole, shared):
        assert mb.teacher_topk_ids is not None and mb.teacher_topk_ids.shape[1] == mb.num_tokens
    trained_w, trained_s = whole.loss_mask[0], shared.loss_mask[0]
    assert torch.equal(whole.target_ids[0][trained_w], shared.target_ids[0][trained_s])
    assert torch.equal(whole.teacher_topk_ids[0][trained_w], shared.teacher_topk_ids[0][trained_s])  # type: ignore[index]
    assert torch.equal(whole.teacher_topk_logprobs[0][trained_w], shared.teacher_topk_logprobs[0][trained_s])  # type: ignore[index]
    assert not (shared.teacher_topk_ids[0][~trained_s] >= 0).any()  # type: ignore[index]
