"""Packing: layout, limits, and packed == unpacked losses and gradients on the tiny Qwen3 student."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from apprentice.config import ModelConfig
from apprentice.testing.tiny import save_tiny_student
from apprentice.trainer.losses import LossInputs, sft_loss, target_logprobs
from apprentice.trainer.model import load_model
from apprentice.trainer.packing import PackingError, collate, pack_samples, placeholder_batch, plan_bins
from apprentice.types import TrainingSample


def sample(ids: list[int], mask: list[bool] | None = None, adv: float = 1.0) -> TrainingSample:
    return TrainingSample(ids, mask or [True] * len(ids), [-0.5] * len(ids), adv)


def random_samples(n: int, seed: int, lo: int = 3, hi: int = 40) -> list[TrainingSample]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        t = rng.randint(lo, hi)
        out.append(TrainingSample([rng.randrange(3, 512) for _ in range(t)], [i >= t // 3 for i in range(t)],
                                  [0.0] * t, 1.0))
    return out


def test_collate_layout_matches_docstring_example() -> None:
    mb = collate([sample([10, 11, 12], [False, True, True], adv=2.0), sample([20, 21], [False, True])])
    assert mb.input_ids.tolist() == [[10, 11, 12, 20, 21]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    assert mb.target_ids.tolist() == [[11, 12, 0, 21, 0]]
    assert mb.loss_mask.tolist() == [[True, True, False, True, False]]
    assert mb.advantages.tolist() == [[2.0, 2.0, 2.0, 1.0, 1.0]]
    assert mb.cu_seqlens.tolist() == [0, 3, 5]
    assert mb.max_seqlen == 3 and mb.num_loss_tokens == 3 and mb.num_pad_tokens == 0


def test_pack_respects_capacity_and_keeps_every_sample() -> None:
    samples = random_samples(50, seed=0)
    mbs = pack_samples(samples, 64)
    assert all(mb.num_tokens <= 64 for mb in mbs)
    assert sum(mb.num_tokens for mb in mbs) == sum(len(s) for s in samples)
    assert sum(mb.num_loss_tokens for mb in mbs) == sum(sum(s.loss_mask[1:]) for s in samples)
    # First-fit decreasing is close to the lower bound on the number of rows.
    assert len(mbs) <= -(-sum(len(s) for s in samples) // 64) + 2


def test_plan_bins_is_deterministic() -> None:
    lengths = [5, 9, 3, 9, 1, 7]
    assert plan_bins(lengths, 10) == plan_bins(lengths, 10)
    assert sorted(i for b in plan_bins(lengths, 10) for i in b) == list(range(6))


def test_oversized_and_empty_samples_are_clear_errors() -> None:
    with pytest.raises(PackingError, match="micro_batch_tokens = 16"):
        pack_samples([sample(list(range(20)))], 16)
    with pytest.raises(PackingError, match="no tokens"):
        pack_samples([TrainingSample([], [], [], 1.0)], 16)


def test_placeholder_has_no_loss_tokens() -> None:
    mb = placeholder_batch()
    assert mb.num_tokens == 1 and mb.num_loss_tokens == 0 and mb.num_pad_tokens == 1


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_student(tmp_path_factory.mktemp("student"))


def loss_and_grads(model: torch.nn.Module, groups: list[list[TrainingSample]], n: int) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    total = 0.0
    for group in groups:
        mb = collate(group)
        logits = model(**mb.model_kwargs()).logits[0]
        lp = target_logprobs(logits, mb.target_ids[0])
        loss, _ = sft_loss(LossInputs(lp, mb.inference_logprobs[0], mb.loss_mask[0], mb.advantages[0], n))
        loss.backward()
        total += float(loss.detach())
    return total, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attn", [None, "sdpa", "eager"])
def test_packed_equals_unpacked(student_dir: Path, attn: str | None) -> None:
    """One packed row vs one forward per sample: same loss, same gradients, for every attention backend."""
    model = load_model(ModelConfig(name=str(student_dir), attn_implementation=attn), torch.device("cpu"))
    samples = random_samples(6, seed=1)
    n = sum(sum(s.loss_mask[1:]) for s in samples)
    packed_loss, packed_grads = loss_and_grads(model, [samples], n)
    single_loss, single_grads = loss_and_grads(model, [[s] for s in samples], n)
    assert packed_loss == pytest.approx(single_loss, rel=1e-5)
    assert packed_grads.keys() == single_grads.keys() and packed_grads
    for name, grad in packed_grads.items():
        torch.testing.assert_close(grad, single_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_cross_sample_attention_would_change_the_loss(student_dir: Path) -> None:
    """Guard for the test above: without restarting positions/boundaries the packed loss differs."""
    model = load_model(ModelConfig(name=str(student_dir)), torch.device("cpu"))
    samples = random_samples(4, seed=2)
    mb = collate(samples)
    with torch.no_grad():
        right = model(**mb.model_kwargs()).logits
        leaky = model(input_ids=mb.input_ids, use_cache=False).logits  # one long causal sequence
    assert not torch.allclose(right, leaky, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_packed_equals_unpacked_on_gpu_bf16(student_dir: Path) -> None:
    """GPU path: bf16 parameters and the default attention choice (flash-attn varlen when installed)."""
    device = torch.device("cuda")
    model = load_model(ModelConfig(name=str(student_dir)), device)
    assert model.dtype == torch.bfloat16
    samples = random_samples(6, seed=3)
    n = sum(sum(s.loss_mask[1:]) for s in samples)
    losses = []
    for groups in ([samples], [[s] for s in samples]):
        total = 0.0
        for group in groups:
            mb = collate(group).to(device)
            with torch.no_grad():
                lp = target_logprobs(model(**mb.model_kwargs()).logits[0], mb.target_ids[0])
            total += sft_loss(LossInputs(lp, mb.inference_logprobs[0], mb.loss_mask[0], mb.advantages[0], n))[0].item()
        losses.append(total)
    assert losses[0] == pytest.approx(losses[1], rel=2e-2)  # bf16 tolerance


def test_shared_prompt_layout_matches_docstring_example() -> None:
    a = sample([1, 2, 30, 31], [False, False, True, True], adv=2.0)
    b = sample([1, 2, 40], [False, False, True], adv=-1.0)
    (mb,) = pack_samples([a, b], 64, share_prompts=True)
    assert mb.input_ids.tolist() == [[1, 2, 30, 31, 2, 40]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 1, 2]]
    assert mb.target_ids.tolist() == [[2, 30, 31, 0, 40, 0]]
    assert mb.loss_mask.tolist() == [[False, True, True, False, True, False]]
    assert mb.advantages.tolist() == [[0.0, 2.0, 2.0, 2.0, -1.0, -1.0]]
    assert mb.cu_seqlens.tolist() == [0, 1, 4, 6] and mb.prefix_of == [-1, 0, 0]
    assert mb.num_shared_tokens == 1 and mb.num_loss_tokens == 3
    assert pack_samples([a, b], 64)[0].prefix_of is None  # off by default: each sample whole


def test_shared_prompts_group_only_identical_untrained_beginnings_and_respect_capacity() -> None:
    prompt = list(range(100, 120))
    group = [sample(prompt + [200 + i] * (3 + i), [False] * 20 + [True] * (3 + i)) for i in range(4)]
    other = sample(prompt[:-1] + [7, 8, 9], [False] * 19 + [True] * 3)  # differs in its last prompt token only
    early = sample(list(range(50, 60)), [False, True] + [True] * 8)  # trained from token 1: nothing to share
    rows = pack_samples([*group, other, early], 60, share_prompts=True)
    assert all(mb.num_tokens <= 60 for mb in rows)
    # The group (19 shared + 4 tails of 4..7 tokens = 45) fits one row; `other` shares with nobody.
    shared = [mb for mb in rows if mb.prefix_of is not None]
    assert len(shared) == 1 and shared[0].num_shared_tokens == 3 * 19
    assert sum(mb.num_tokens + mb.num_shared_tokens for mb in rows) == sum(len(s) for s in [*group, other, early])
    # A capacity the whole group does not fit: it is split, each part with its own copy of the prefix.
    split = pack_samples(group, 30, share_prompts=True)
    assert len(split) >= 2 and all(mb.num_tokens <= 30 for mb in split)
    assert sum(mb.num_loss_tokens for mb in split) == sum(mb.num_loss_tokens for mb in pack_samples(group, 30))


def test_shared_prompts_give_the_losses_and_gradients_of_whole_samples(tmp_path: Path) -> None:
    """Through the tiny student and the varlen attention: four groups of four answers, with per-token
    advantages and top-k-free rl-style inputs, packed shared and unshared: same loss and gradients."""
    from apprentice.config import RLLossConfig
    from apprentice.trainer.logprobs import micro_batch_loss
    from apprentice.trainer.losses import build_loss

    model = load_model(ModelConfig(name=str(save_tiny_student(tmp_path / "student"))), torch.device("cpu"))
    assert model.config._attn_implementation == "apprentice_varlen"
    g = torch.Generator().manual_seed(0)
    samples = []
    for p in range(4):
        prompt = torch.randint(3, 60, (9 + 3 * p,), generator=g).tolist()
        for k in range(4):
            tail = torch.randint(3, 60, (2 + k,), generator=g).tolist()
            n = len(prompt) + len(tail)
            lps = (-4.0 - 0.2 * torch.rand(n, generator=g)).tolist()
            advs = torch.randn(n, generator=g).tolist()
            samples.append(TrainingSample(prompt + tail, [i >= len(prompt) for i in range(n)], lps, 0.0, token_advantages=advs))
    loss_fn = build_loss(RLLossConfig(kl_coef=0.1, ratio_low=1e-6, ratio_high=1e6))
    results = []
    for share in (False, True):
        rows = pack_samples(samples, 48, share_prompts=share)
        assert (rows[0].prefix_of is not None) == share
        model.zero_grad(set_to_none=True)
        total = torch.zeros(())
        for mb in rows:
            loss, _ = micro_batch_loss(model, mb, loss_fn, 40, 5)
            loss.backward()
            total += loss.detach()
        results.append((total, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    assert float(l0) != 0.0
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-6, msg=name)
