"""parallelize(): activation checkpointing, compile and FSDP2 with the precision policy, applied in one place."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.fsdp import FSDPModule

from apprentice.config import Config
from apprentice.handoff.hfdir import write_hf_dir
from apprentice.handoff.paths import MARKER
from apprentice.testing.tiny import save_tiny_student
from apprentice.tokenizer import load_tokenizer
from apprentice.trainer.logprobs import LOSS_METHOD
from apprentice.trainer.losses import build_loss
from apprentice.trainer.model import load_model
from apprentice.trainer.packing import pack_samples
from apprentice.trainer.parallelize import needs_mesh, parallelize, transformer_blocks
from apprentice.trainer.precision import PRECISIONS
from apprentice.trainer.world import World, init_distributed, shutdown
from apprentice.types import TrainingSample

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_student(tmp_path_factory.mktemp("student"))


@pytest.fixture
def one_rank_mesh() -> Iterator[object]:
    mesh = init_distributed(World(), CPU, mesh=True)
    yield mesh
    shutdown(World(), completed=True)


def config(student: Path, **trainer: object) -> Config:
    return Config.model_validate({"model": {"name": str(student)}, "output_dir": "/tmp/unused", "inference": {},
                                  "trainer": {"loss": {"type": "sft"}, **trainer}})  # fmt: skip


def batch() -> object:
    samples = [TrainingSample(list(range(3, 3 + n)), [i >= 2 for i in range(n)], [0.0] * n, 1.0) for n in (12, 20)]
    return pack_samples(samples, 64)[0]


def loss_and_grads(model: torch.nn.Module) -> tuple[float, dict[str, torch.Tensor]]:
    loss, _ = getattr(model, LOSS_METHOD)(batch(), build_loss(config(Path("x")).trainer.loss), 30, 8)
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        grads[name] = g.clone()
    return float(loss.detach()), grads


def test_mesh_is_needed_for_several_ranks_or_mixed_precision() -> None:
    assert needs_mesh(PRECISIONS["bf16-mixed"], 1) and needs_mesh(PRECISIONS["fp32"], 2)
    assert not needs_mesh(PRECISIONS["fp32"], 1) and not needs_mesh(PRECISIONS["bf16"], 1)


def test_bf16_mixed_computes_in_bf16_and_keeps_fp32_weights_and_grads(student: Path, one_rank_mesh: object) -> None:
    model = load_model(config(student).model, CPU)
    parallelize(model, config(student), one_rank_mesh, PRECISIONS["bf16-mixed"])  # type: ignore[arg-type]
    blocks = transformer_blocks(model)
    assert isinstance(model, FSDPModule) and all(isinstance(b, FSDPModule) for b in blocks)
    seen: list[torch.dtype] = []
    proj = blocks[0].self_attn.q_proj  # type: ignore[union-attr]
    proj.register_forward_pre_hook(lambda m, args: seen.append(m.weight.dtype))
    _, grads = loss_and_grads(model)
    assert seen == [torch.bfloat16]  # the weights the matmul saw
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights
    assert all(g.dtype == torch.float32 and bool(g.abs().sum() > 0) for g in grads.values())  # reduced in fp32


def counted(fn: Any, count: list[int]) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        return fn(*args, **kwargs)

    return wrapper


def test_activation_checkpointing_recomputes_blocks_with_the_same_gradients(student: Path) -> None:
    results, calls = [], []
    for ac in (False, True):
        cfg = config(student)
        cfg.model.activation_checkpointing = ac
        model = parallelize(load_model(cfg.model, CPU), cfg, None, PRECISIONS["fp32"])
        count = [0]
        inner = transformer_blocks(model)[0].mlp  # type: ignore[union-attr]
        inner.forward = counted(inner.forward, count)  # module hooks do not fire in a checkpoint's replay
        results.append(loss_and_grads(model))
        calls.append(count[0])
    assert calls == [1, 2]  # checkpointed: the block's insides run again in backward
    (l0, g0), (l1, g1) = results
    assert l1 == pytest.approx(l0, rel=1e-6)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.slow
def test_compiled_blocks_give_the_eager_loss_and_keep_parameter_names(student: Path) -> None:
    eager = parallelize(load_model(config(student).model, CPU), config(student), None, PRECISIONS["fp32"])
    compiled = parallelize(load_model(config(student).model, CPU), config(student, compile=True), None, PRECISIONS["fp32"])
    assert [n for n, _ in eager.named_parameters()] == [n for n, _ in compiled.named_parameters()]
    (l0, g0), (l1, g1) = loss_and_grads(eager), loss_and_grads(compiled)
    assert l1 == pytest.approx(l0, rel=1e-5)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-6, msg=name)


def test_export_replaces_a_previous_export_atomically(student: Path, tmp_path: Path) -> None:
    cfg = config(student)
    model, tokenizer = load_model(cfg.model, CPU), load_tokenizer(cfg.model)
    target = tmp_path / "final"
    write_hf_dir(model, tokenizer, target)
    (target / "stale.txt").write_text("from the previous export")
    write_hf_dir(model, tokenizer, target)
    assert (target / MARKER).is_file() and (target / "model.safetensors").is_file()
    assert not (target / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no temporary or old directory left behind
