"""Chunked lm_head loss: the same loss, metrics and gradients as full [T, V] logits, without keeping them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from apprentice.config import ModelConfig, RLLossConfig, SFTLossConfig
from apprentice.testing.tiny import save_tiny_student
from apprentice.trainer.logprobs import chunked_loss, full_loss, micro_batch_loss
from apprentice.trainer.losses import LossFn, LossInputs, build_loss
from apprentice.trainer.model import load_model
from apprentice.trainer.packing import pack_samples
from apprentice.types import TrainingSample

T, H, V = 50, 16, 37
LOSS_CONFIGS = {
    "sft": SFTLossConfig(),
    # A trust region that masks some tokens and a KL penalty: every branch of the rl loss is exercised.
    "rl": RLLossConfig(ratio_low=0.6, ratio_high=1.5, kl_coef=0.1),
}


def make_case(seed: int, dtype: torch.dtype, bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, LossInputs]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g).to(dtype).requires_grad_()
    weight = (0.5 * torch.randn(V, H, generator=g)).to(dtype).requires_grad_()
    b = (0.1 * torch.randn(V, generator=g)).to(dtype).requires_grad_() if bias else None
    targets = torch.randint(0, V, (T,), generator=g)
    mask = torch.rand(T, generator=g) < 0.7
    with torch.no_grad():
        lp = torch.log_softmax(F.linear(hidden, weight, b).float(), -1)[torch.arange(T), targets]
    inference = lp + 0.3 * torch.randn(T, generator=g)
    inputs = LossInputs(torch.empty(0), inference, mask, torch.randn(T, generator=g), int(mask.sum()) + 3)
    return hidden, weight, b, targets, inputs


def grads(loss: torch.Tensor, tensors: list[torch.Tensor | None]) -> list[torch.Tensor]:
    present = [t for t in tensors if t is not None]
    return list(torch.autograd.grad(loss, present))


@pytest.mark.parametrize("loss_type", sorted(LOSS_CONFIGS))
@pytest.mark.parametrize(("dtype", "bias", "chunk", "tol"), [
    (torch.float32, False, 7, 1e-5),   # uneven last chunk
    (torch.float32, True, 64, 1e-5),   # one chunk larger than T
    (torch.bfloat16, False, 16, 2e-2),  # bf16 compute, as under bf16-mixed
])  # fmt: skip
def test_chunked_matches_full_values_metrics_and_gradients(loss_type: str, dtype: torch.dtype, bias: bool, chunk: int, tol: float) -> None:
    loss_fn: LossFn = build_loss(LOSS_CONFIGS[loss_type])
    hidden, weight, b, targets, inputs = make_case(0, dtype, bias)
    ref_loss, ref_metrics = full_loss(F.linear(hidden, weight, b), targets, inputs, loss_fn)
    ref_grads = grads(ref_loss, [hidden, weight, b])
    loss, metrics = chunked_loss(hidden, weight, b, targets, inputs, loss_fn, chunk)
    got_grads = grads(loss * 2.0, [hidden, weight, b])  # an upstream gradient scales the saved gradients
    torch.testing.assert_close(loss, ref_loss.float(), rtol=tol, atol=tol)
    assert metrics.keys() == ref_metrics.keys()
    for name in metrics:
        torch.testing.assert_close(metrics[name], ref_metrics[name].float(), rtol=tol, atol=tol, msg=name)
    for got, ref in zip(got_grads, ref_grads, strict=True):
        assert got.dtype == ref.dtype
        torch.testing.assert_close(got.float(), 2.0 * ref.float(), rtol=tol, atol=tol)


def test_chunked_backward_keeps_no_logits_sized_tensor() -> None:
    """What the backward holds: the full path saves [T, V] logits, the chunked one only [T, H] and [V, H]."""
    hidden, weight, _, targets, inputs = make_case(1, torch.float32, False)
    loss_fn = build_loss(SFTLossConfig())

    def saved_sizes(run: object) -> list[int]:
        sizes: list[int] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            run()  # type: ignore[operator]
        return sizes

    full = saved_sizes(lambda: full_loss(F.linear(hidden, weight), targets, inputs, loss_fn))
    chunked = saved_sizes(lambda: chunked_loss(hidden, weight, None, targets, inputs, loss_fn, 8))
    assert max(full) >= T * V
    assert max(chunked) <= max(T * H, V * H) < T * V


def test_model_loss_chunked_equals_model_forward(tmp_path: Path) -> None:
    """Through the tiny student (tied lm_head): decoder + chunked head == the model's own logits path."""
    model = load_model(ModelConfig(name=str(save_tiny_student(tmp_path / "student"))), torch.device("cpu"))
    samples = [TrainingSample(list(range(3, 3 + n)), [i >= 2 for i in range(n)], [-1.0] * n, 0.5) for n in (9, 17, 30)]
    (mb,) = pack_samples(samples, 64)
    for loss_type in LOSS_CONFIGS:
        loss_fn = build_loss(LOSS_CONFIGS[loss_type])
        results = []
        for chunk in (0, 5):  # 0: the model's own forward and full logits
            model.zero_grad(set_to_none=True)
            loss, metrics = micro_batch_loss(model, mb, loss_fn, 40, chunk)
            loss.backward()
            results.append((loss.detach(), metrics, {n: p.grad.clone() for n, p in model.named_parameters()}))
        (l0, m0, g0), (l1, m1, g1) = results
        torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
        for name in m0:
            torch.testing.assert_close(m1[name], m0[name], rtol=1e-5, atol=1e-6, msg=name)
        for name in g0:
            torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-6, msg=name)


def test_model_loss_over_trained_positions_equals_every_position(tmp_path: Path) -> None:
    """The head runs on trained positions only; loss, metrics and gradients equal those over every position."""
    model = load_model(ModelConfig(name=str(save_tiny_student(tmp_path / "student"))), torch.device("cpu"))
    # Long untrained prompts (mask 0 on the first 12 tokens), a trained turn in the middle of one sample.
    samples = [
        TrainingSample(list(range(3, 3 + n)), [12 <= i < n - lo for i in range(n)], [-1.0] * n, 0.5)
        for n, lo in ((20, 0), (31, 5), (16, 0))
    ]
    (mb,) = pack_samples(samples, 128)
    assert 0 < mb.num_loss_tokens < mb.num_tokens // 2
    for loss_type in LOSS_CONFIGS:
        loss_fn = build_loss(LOSS_CONFIGS[loss_type])
        results = []
        for chunk in (0, 5):
            model.zero_grad(set_to_none=True)
            loss, metrics = micro_batch_loss(model, mb, loss_fn, 40, chunk)
            loss.backward()
            results.append((loss.detach(), metrics, {n: p.grad.clone() for n, p in model.named_parameters()}))
        model.zero_grad(set_to_none=True)
        inputs = LossInputs(torch.empty(0), mb.inference_logprobs[0], mb.loss_mask[0], mb.advantages[0], 40)
        logits = model(**mb.model_kwargs()).logits[0]  # [T, V]: every position
        ref_loss, ref_metrics = full_loss(logits, mb.target_ids[0], inputs, loss_fn)
        ref_loss.backward()
        ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        for loss, metrics, grads_ in results:
            torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-5, atol=1e-6)
            for name in ref_metrics:
                torch.testing.assert_close(metrics[name], ref_metrics[name], rtol=1e-5, atol=1e-6, msg=name)
            for name in ref_grads:
                torch.testing.assert_close(grads_[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_row_without_trained_positions_still_backpropagates(tmp_path: Path) -> None:
    """A fully masked row (a rank's placeholder) gives loss 0 and zero gradients, but a gradient for every
    parameter: backward ran through the whole model, as FSDP's collectives need."""
    model = load_model(ModelConfig(name=str(save_tiny_student(tmp_path / "student"))), torch.device("cpu"))
    (mb,) = pack_samples([TrainingSample([3, 4, 5, 6], [False] * 4, [0.0] * 4, 1.0)], 16)
    for chunk in (0, 5):
        model.zero_grad(set_to_none=True)
        loss, _ = micro_batch_loss(model, mb, build_loss(LOSS_CONFIGS["rl"]), 1, chunk)
        loss.backward()
        assert float(loss.detach()) == 0.0
        for name, p in model.named_parameters():
            assert p.grad is not None, name
            assert not p.grad.any(), name
