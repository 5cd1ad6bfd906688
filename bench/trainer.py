"""Training throughput: apprentice's packed step vs a plain padded transformers loop, measured in one run.

Both train the same tiny Qwen3 student (apprentice.testing.tiny) on the same mixed-length samples, one
optimizer step over the whole batch per timing (gradient accumulation over micro-batches, AdamW, clipping).
    padded:     micro-batches of --padded-batch samples padded to their longest, 2-D attention mask, labels -100
    apprentice: trainer.train.train_step over rows packed to --micro-batch-tokens (no padding, varlen attention)
Tokens/s counts real tokens only, so padding shows up as lost throughput. The MFU estimate divides model FLOPs
(6 x params x tokens + causal attention) by the measured fp32 matmul peak of this machine.

    python bench/trainer.py [--samples 64] [--steps 3] [--device cpu]
Last line: `apprentice/padded tokens-per-second ratio: N.NN`.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from timing import timed  # noqa: E402  (bench/ is the script's directory)
from transformers import AutoModelForCausalLM  # noqa: E402

from apprentice.config import Config, OptimConfig  # noqa: E402
from apprentice.testing.tiny import save_tiny_student  # noqa: E402
from apprentice.trainer.losses import build_loss  # noqa: E402
from apprentice.trainer.model import load_model  # noqa: E402
from apprentice.trainer.optim import build_optimizer  # noqa: E402
from apprentice.trainer.parallelize import needs_mesh, parallelize  # noqa: E402
from apprentice.trainer.precision import resolve_precision  # noqa: E402
from apprentice.trainer.train import train_step  # noqa: E402
from apprentice.trainer.world import World, init_distributed  # noqa: E402
from apprentice.types import TrainingSample  # noqa: E402


def make_samples(n: int, seed: int, vocab: int) -> list[TrainingSample]:
    """Chat-like length mix: many short samples, a long tail up to 1024 tokens; the first ~third is prompt."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        t = int(min(1024, max(16, rng.lognormvariate(5.3, 0.7))))
        prompt = t // 3
        out.append(TrainingSample([rng.randrange(3, vocab) for _ in range(t)], [i >= prompt for i in range(t)],
                                  [0.0] * t, 1.0))
    return out


def padded_step(model: torch.nn.Module, samples: list[TrainingSample], batch: int, device: torch.device) -> None:
    """The usual transformers loop: pad each micro-batch to its longest sample, mask pads, mean over tokens."""
    total = sum(sum(s.loss_mask[1:]) for s in samples)
    for i in range(0, len(samples), batch):
        group = samples[i : i + batch]
        width = max(len(s) for s in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        attn = torch.zeros(len(group), width, dtype=torch.long)
        labels = torch.full((len(group), width), -100, dtype=torch.long)
        for r, s in enumerate(group):
            ids[r, : len(s)] = torch.tensor(s.token_ids)
            attn[r, : len(s)] = 1
            labels[r, : len(s)] = torch.tensor([t if m else -100 for t, m in zip(s.token_ids, s.loss_mask, strict=True)])
        ids, attn, labels = ids.to(device), attn.to(device), labels.to(device)
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
        ) / total
        loss.backward()



def matmul_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    n = 2048 if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = min(timed(lambda: a @ b, device) for _ in range(5))
    return 2 * n**3 / best


def model_flops(model: torch.nn.Module, samples: list[TrainingSample]) -> float:
    """Training FLOPs of one pass over `samples`: 6 N per token plus causal attention (fwd 2x, bwd 4x)."""
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    attn = sum(len(s) ** 2 for s in samples) * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim
    return 6 * n_params * sum(len(s) for s in samples) + 6 * attn  # QK^T and AV, causal half, fwd + bwd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per method (after one warmup step)")
    parser.add_argument("--micro-batch-tokens", type=int, default=4096)
    parser.add_argument("--padded-batch", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    world = World()
    with tempfile.TemporaryDirectory() as tmp:
        student = save_tiny_student(Path(tmp) / "student")
        cfg = Config.model_validate({"model": {"name": str(student)}, "output_dir": tmp, "inference": {},
                                     "trainer": {"loss": {"type": "sft"}, "micro_batch_tokens": args.micro_batch_tokens}})
        precision = resolve_precision(cfg.trainer, cfg.model, device)  # what the trainer runs: fp32 on CPU
        mesh = init_distributed(world, device, mesh=needs_mesh(precision, world.world_size))
        ours = parallelize(load_model(cfg.model, device, precision.param_dtype), cfg, mesh, precision)
        padded = AutoModelForCausalLM.from_pretrained(student, dtype=precision.compute_dtype, attn_implementation="sdpa").to(device)
    padded.train()
    samples = make_samples(args.samples, seed=0, vocab=ours.config.vocab_size)
    tokens = sum(len(s) for s in samples)
    pad_waste = 1 - tokens / sum(
        len(g) * max(len(s) for s in g) for g in (samples[i : i + args.padded_batch] for i in range(0, len(samples), args.padded_batch))
    )
    print(f"device {device}, dtype {precision.compute_dtype}, {len(samples)} samples, {tokens} tokens "
          f"(lengths {min(len(s) for s in samples)}..{max(len(s) for s in samples)}); padded loop wastes {pad_waste:.0%}")

    optim_cfg = OptimConfig(lr=1e-4)
    opt_ours, opt_padded = build_optimizer(ours.parameters(), optim_cfg), build_optimizer(padded.parameters(), optim_cfg)
    params = [p for p in ours.parameters() if p.requires_grad]
    loss_fn = build_loss(cfg.trainer.loss)

    def step_ours() -> None:
        train_step(ours, samples, loss_fn, params, world, device, micro_batch_tokens=args.micro_batch_tokens,
                   grad_clip=1.0, logprob_chunk_tokens=cfg.trainer.logprob_chunk_tokens)
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_padded() -> None:
        padded_step(padded, samples, args.padded_batch, device)
        torch.nn.utils.clip_grad_norm_(padded.parameters(), 1.0)
        opt_padded.step()
        opt_padded.zero_grad(set_to_none=True)

    step_ours(), step_padded()  # warmup: allocator, kernels, lazy inits
    t_ours, t_padded = [], []
    for _ in range(args.steps):  # interleaved, so machine noise hits both alike
        t_ours.append(timed(step_ours, device))
        t_padded.append(timed(step_padded, device))
    ours_tps, padded_tps = tokens / statistics.median(t_ours), tokens / statistics.median(t_padded)

    peak = matmul_peak_flops(device, precision.compute_dtype)
    flops = model_flops(ours, samples)
    print(f"padded transformers loop: {padded_tps:10.0f} tokens/s  (median step {statistics.median(t_padded):.3f} s)")
    print(f"apprentice packed step:   {ours_tps:10.0f} tokens/s  (median step {statistics.median(t_ours):.3f} s)")
    print(f"MFU estimate: apprentice {flops / statistics.median(t_ours) / peak:.2%}, padded "
          f"{flops / statistics.median(t_padded) / peak:.2%} of the measured {precision.compute_dtype} matmul peak "
          f"({peak / 1e9:.1f} GFLOP/s; model FLOPs {flops / 1e9:.2f} GFLOP per step)")
    print(f"apprentice/padded tokens-per-second ratio: {ours_tps / padded_tps:.2f}")


if __name__ == "__main__":
    main()
