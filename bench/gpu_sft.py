"""SFT throughput of the real trainer step on a Qwen3-0.6B-shaped model: tokens/s and MFU against the GPU's
bf16 peak.

The model is built offline from a config (Qwen3-0.6B's shapes: 28 layers, hidden 1024, 16 query / 8 KV heads
of 128, MLP 3072, 151,936-token vocabulary, tied embeddings), randomly initialised. Each step packs random
samples into --micro-batches rows of --micro-batch-tokens tokens (8k) and runs apprentice's own
`train_step` (varlen attention, chunked lm_head loss) after `parallelize` (bf16-mixed: fp32 master weights,
bf16 compute; optional activation checkpointing and torch.compile), then AdamW. Attention is flash-attn's
varlen kernel when flash-attn is installed, else apprentice's per-sample sdpa (trainer/attention.py).

MFU = model FLOPs / (step time x peak), model FLOPs = 6 x parameters x tokens + 6 x layers x heads x
head_dim x sum(L_i^2) (causal attention, forward + backward), the parameter count including the tied lm_head
once (its matmul is real work; the embedding lookup is not counted separately). Peak: the card's dense bf16
figure from a table, or --peak-tflops.
Reference to beat (prime-rl's published SFT of Qwen3-0.6B at 8k on one H100): 26.0k tokens/s, 16.8% MFU.

    python bench/gpu_sft.py                                  # one GPU
    torchrun --nproc-per-node 8 bench/gpu_sft.py             # FSDP2 over 8 GPUs (tokens/s is per GPU)
    python bench/gpu_sft.py --tiny                           # seconds on CPU: proves the script runs
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import Qwen3Config, Qwen3ForCausalLM  # noqa: E402

from apprentice.config import Config  # noqa: E402
from apprentice.trainer.losses import build_loss  # noqa: E402
from apprentice.trainer.model import resolve_attention  # noqa: E402
from apprentice.trainer.optim import build_optimizer  # noqa: E402
from apprentice.trainer.parallelize import needs_mesh, parallelize  # noqa: E402
from apprentice.trainer.precision import resolve_precision  # noqa: E402
from apprentice.trainer.train import train_step  # noqa: E402
from apprentice.trainer.world import World, init_distributed, pick_device, shutdown  # noqa: E402
from apprentice.types import TrainingSample  # noqa: E402

QWEN3_0_6B = {
    "vocab_size": 151_936, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
    "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 40_960,
    "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
}  # fmt: skip
TINY = {**QWEN3_0_6B, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}  # fmt: skip

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' datasheets; matched by substring of
# torch.cuda.get_device_name(), most specific first.
BF16_PEAK_TFLOPS = [
    ("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("GH200", 989.4), ("B200", 2250.0),
    ("A100", 312.0), ("L40S", 362.1), ("A10G", 70.0), ("L4", 121.0), ("RTX 4090", 165.2),
]  # fmt: skip


def bf16_peak_flops(device: torch.device, override_tflops: float | None) -> tuple[float, str]:
    if override_tflops is not None:
        return override_tflops * 1e12, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in BF16_PEAK_TFLOPS:
            if key in name:
                return tflops * 1e12, f"{name} datasheet"
        raise SystemExit(f"no bf16 peak known for {name!r}; pass --peak-tflops")
    n = 512  # CPU (--tiny smoke runs): a measured bf16 matmul rate, only so the line is printed
    a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
    start = time.perf_counter()
    for _ in range(4):
        a @ b
    return 4 * 2 * n**3 / (time.perf_counter() - start), "measured CPU bf16 matmul"


def make_step_samples(rng: random.Random, rows: int, row_tokens: int, min_len: int, max_len: int, vocab: int) -> list[TrainingSample]:
    """Samples whose lengths fill `rows` packed rows of `row_tokens` (the last sample of a row is cut to fit)."""
    samples = []
    for _ in range(rows):
        room = row_tokens
        while room > 0:
            n = min(room, rng.randint(min_len, max_len))
            ids = [rng.randrange(vocab) for _ in range(n)]
            samples.append(TrainingSample(ids, [i >= n // 4 for i in range(n)], [0.0] * n, 1.0))  # 1/4 prompt
            room -= n
    return samples


def model_flops(config: Qwen3Config, n_params: int, samples: list[TrainingSample]) -> float:
    attn = sum(len(s) ** 2 for s in samples) * config.num_hidden_layers * config.num_attention_heads * config.head_dim
    return 6.0 * n_params * sum(len(s) for s in samples) + 6.0 * attn


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer, hidden-64 model and 256-token rows (CPU smoke test)")
    parser.add_argument("--micro-batch-tokens", type=int, default=8192)
    parser.add_argument("--micro-batches", type=int, default=4, help="packed rows per optimizer step (per rank)")
    parser.add_argument("--min-len", type=int, default=None, help="shortest sample (default: a full row)")
    parser.add_argument("--max-len", type=int, default=None, help="longest sample (default: a full row)")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, kernels, compile)")
    parser.add_argument("--precision", default="bf16-mixed", choices=["bf16-mixed", "fp32", "bf16"])
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block (trainer.compile)")
    parser.add_argument("--logprob-chunk-tokens", type=int, default=1024)
    parser.add_argument("--attn", default=None, help="attention implementation (default: flash-attn if installed, else apprentice_varlen)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not in the table")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args(argv)
    if args.tiny:
        args.micro_batch_tokens = min(args.micro_batch_tokens, 256)
    min_len = args.min_len or args.micro_batch_tokens
    max_len = max(min_len, args.max_len or args.micro_batch_tokens)

    world = World.from_env()
    device = pick_device(args.device, world)
    cfg = Config.model_validate({
        "model": {"name": "qwen3-0.6b-shaped (random init)", "activation_checkpointing": args.activation_checkpointing,
                  "attn_implementation": args.attn},
        "output_dir": "/tmp/apprentice-gpu-sft", "inference": {},
        "trainer": {"loss": {"type": "sft"}, "precision": args.precision, "compile": args.compile,
                    "micro_batch_tokens": args.micro_batch_tokens, "logprob_chunk_tokens": args.logprob_chunk_tokens},
    })  # fmt: skip
    precision = resolve_precision(cfg.trainer, cfg.model, device)
    mesh = init_distributed(world, device, mesh=needs_mesh(precision, world.world_size))
    torch.manual_seed(0)
    config = Qwen3Config(**(TINY if args.tiny else QWEN3_0_6B))
    config.use_cache = False
    config._attn_implementation = resolve_attention(cfg.model, device)
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(precision.param_dtype)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())  # before sharding: the whole model
    model = parallelize(model, cfg, mesh, precision)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg.trainer.optim)
    loss_fn = build_loss(cfg.trainer.loss)
    rng = random.Random(world.rank)
    peak, peak_source = bf16_peak_flops(device, args.peak_tflops)
    if world.is_main:
        print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'} x {world.world_size}, "
              f"{n_params / 1e6:.1f}M params, attention {config._attn_implementation}, precision {precision.name}, "
              f"{args.micro_batches} x {args.micro_batch_tokens} tokens per step per rank (samples {min_len}-{max_len}), "
              f"activation checkpointing {args.activation_checkpointing}, compile {args.compile}", flush=True)

    def one_step() -> tuple[float, float, float, float]:
        samples = make_step_samples(rng, args.micro_batches, args.micro_batch_tokens, min_len, max_len, config.vocab_size)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = train_step(model, samples, loss_fn, params, world, device, micro_batch_tokens=args.micro_batch_tokens,
                            grad_clip=1.0, logprob_chunk_tokens=args.logprob_chunk_tokens)  # fmt: skip
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        flops = model_flops(config, n_params, samples)
        return elapsed, sum(len(s) for s in samples), flops / elapsed / peak, result.metrics["loss/total"]

    try:
        for _ in range(args.warmup):
            one_step()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        runs = [one_step() for _ in range(args.steps)]
        step_s = statistics.median(r[0] for r in runs)
        tokens_per_s = statistics.median(r[1] / r[0] for r in runs)
        mfu = statistics.median(r[2] for r in runs)
        if world.is_main:
            memory = f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else ""
            print(f"median step {step_s:.3f} s{memory}, last loss {runs[-1][3]:.3f} (random data: about ln(vocab))")
            print(f"tokens/s per rank: {tokens_per_s:,.0f}   (prime-rl reference, Qwen3-0.6B SFT 8k on one H100: 26,000)")
            print(f"MFU: {mfu:.1%} of {peak / 1e12:.4g} TFLOP/s bf16 ({peak_source})   (reference: 16.8%)")
    finally:
        shutdown(world, completed=True)


if __name__ == "__main__":
    main(sys.argv[1:])
