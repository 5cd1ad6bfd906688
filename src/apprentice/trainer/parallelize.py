"""The trainer's whole parallelism recipe in one place: `parallelize(model, config, mesh, precision)`.

Applied in this order, each step to every transformer block and then to the root (as torchtitan does):
  1. activation checkpointing (model.activation_checkpointing): each block's activations are recomputed in
     backward instead of kept (non-reentrant, so it composes with FSDP2's hooks);
  2. torch.compile of each block's forward (trainer.compile); the module objects and their parameter names
     stay the same, so checkpoints and exports do not change;
  3. FSDP2 `fully_shard` of each block, then of the root (embeddings, final norm, lm_head), with the
     precision's MixedPrecisionPolicy: weights gathered in the compute dtype, gradients reduced in fp32
     into fp32 master shards. With one process and bf16-mixed this runs on a 1-rank mesh: the exact same
     numerics as N ranks (autocast would cast per op and keep norms in fp32: close, but not the same run);
  4. the loss method (trainer/logprobs.py) registered as an FSDP2 forward of the root.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from apprentice.config import Config
from apprentice.trainer.logprobs import bind_loss_method
from apprentice.trainer.precision import Precision


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers, found through transformers' `_no_split_modules` (works for any causal LM)."""
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    # By class ancestry: after fully_shard a block's class is a generated FSDP subclass of the original.
    blocks = [m for m in model.modules() if any(c.__name__ in block_names for c in type(m).__mro__)]
    if not blocks:
        raise RuntimeError(
            f"cannot find the transformer blocks of {type(model).__name__} (its _no_split_modules is "
            f"{sorted(block_names)}); activation checkpointing, compile and FSDP2 work per block"
        )
    return blocks


def needs_mesh(precision: Precision, world_size: int) -> bool:
    """FSDP2 is used with several ranks, and with one for mixed precision (its cast policy needs a mesh)."""
    return world_size > 1 or precision.mixed


def parallelize(model: torch.nn.Module, cfg: Config, mesh: DeviceMesh | None, precision: Precision) -> torch.nn.Module:
    """Wrap `model` in place for training and return it. `mesh` is None only when `needs_mesh` is False."""
    if precision.mixed and mesh is None:
        raise ValueError(f"precision {precision.name} needs a device mesh (see needs_mesh)")
    blocks = transformer_blocks(model)
    if cfg.model.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.trainer.compile:
        apply_compile(blocks)
    if mesh is not None:
        apply_fsdp(model, blocks, mesh, precision)
    bind_loss_method(model)
    return model


def apply_activation_checkpointing(model: torch.nn.Module) -> None:
    """Per-block recomputation through transformers' checkpointing layers (same parameter names as before).

    transformers checkpoints each layer's `forward`, not `__call__`, so FSDP2's hooks stay outside the
    recomputed region (no second all-gather inside the replay).
    """
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable({"use_reentrant": False})
    else:  # transformers before the rename
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # type: ignore[operator]


def apply_compile(blocks: list[torch.nn.Module]) -> None:
    """Compile each block's forward; FSDP2 and checkpointing hooks stay outside the compiled region.

    Shapes change with every packed row, so after the first recompile dynamo marks them dynamic.
    """
    for block in blocks:
        block.forward = torch.compile(block.forward)  # type: ignore[method-assign]


def apply_fsdp(model: torch.nn.Module, blocks: list[torch.nn.Module], mesh: DeviceMesh, precision: Precision) -> None:
    """fully_shard every block, then the root, with the precision policy; gradients summed, not averaged."""
    policy = precision.fsdp_policy()
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # Losses are already normalised by the step's global token count, so ranks' gradients must be
            # summed, not averaged. Plain SUM collectives also work on gloo (no PREMUL_SUM there).
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
