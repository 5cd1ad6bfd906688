"""Memory and time of the loss through the lm_head: full [T, V] logits vs the chunked path vs the chunked distill
loss with the teacher's top-k, in one run.

Each computes a loss of T target tokens from final hidden states [T, H] through an lm_head [V, H] and runs its
backward (gradients of the hidden states and of the head):
    full:    sft loss; logits = h W^T (all T rows), log-softmax in fp32, loss, backward  (the trainer before)
    chunked: sft loss; trainer.logprobs.chunked_loss, --chunk rows at a time, gradients built in the forward
    distill: trainer.loss.type = "distill" (forward_kl) through the same chunked path, with --topk teacher ids
             and logprobs at every position (a tenth of the rows without targets, as after partial coverage)
Peak memory is what each path adds on top of the inputs (hidden states, head weight):
    CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats (the caching allocator's own count).
    CPU:  the kernel's resident-set high-water mark (VmHWM in /proc/self/status, reset by writing 5 to
          /proc/self/clear_refs) minus the resident set before the path ran. torch's CPU allocator has no
          peak statistics and tracemalloc does not see its buffers; every buffer here is far above glibc's
          mmap threshold, so it is mapped on allocation and unmapped on free, and RSS follows live tensors.
Time is the median over --repeats runs of forward + backward, the two paths interleaved (one warmup each).

    python bench/logprobs.py [--tokens 8192] [--vocab 151936] [--hidden 1024] [--chunk 1024] [--topk 64]
                             [--paths full,chunked,distill] [--device cpu]
Last lines: `chunked/full peak memory ratio: R`, `chunked/full time ratio: R`, `distill/chunked peak memory
ratio: R` (the distill loss against the sft path) and `distill/chunked time ratio: R`, for the paths measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import timed  # noqa: E402  (bench/ is the script's directory)

from apprentice.config import DistillLossConfig, SFTLossConfig
from apprentice.trainer.logprobs import chunked_loss, full_loss
from apprentice.trainer.losses import LossInputs, build_loss

STATUS = Path("/proc/self/status")


def _status_kb(field: str) -> int:
    for line in STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in {STATUS}")


def peak_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """Peak memory `fn` adds above what is allocated when it starts (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    base = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    fn()
    return (_status_kb("VmHWM") - base) * 1024



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=1024, help="trainer.logprob_chunk_tokens")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per path after one warmup")
    parser.add_argument("--topk", type=int, default=64, help="k of the distill path's teacher targets")
    parser.add_argument("--paths", default="full,chunked,distill",
                        help="comma-separated subset of full,chunked,distill (e.g. leave out full where it does not fit)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="compute dtype of h and W (default: bfloat16 on CUDA as under bf16-mixed, float32 on CPU)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    torch.manual_seed(0)

    t, v, h = args.tokens, args.vocab, args.hidden
    hidden = torch.randn(t, h, device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, h, device=device, dtype=dtype) * h**-0.5).requires_grad_()
    targets = torch.randint(0, v, (t,), device=device)
    mask = torch.rand(t, device=device) < 0.7
    zeros = torch.zeros(t, device=device)
    inputs = LossInputs(torch.empty(0, device=device), zeros, mask, zeros + 1.0, int(mask.sum()))
    loss_fn = build_loss(SFTLossConfig())
    distill_inputs = dataclasses.replace(inputs, **teacher_topk(t, v, args.topk, mask, device))
    distill_fn = build_loss(DistillLossConfig())
    results: dict[str, list[torch.Tensor]] = {}

    def run_full() -> None:
        loss, _ = full_loss(F.linear(hidden, weight), targets, inputs, loss_fn)
        loss.backward()
        results["full"] = [loss.detach(), hidden.grad, weight.grad]  # type: ignore[list-item]

    def run_chunked() -> None:
        loss, _ = chunked_loss(hidden, weight, None, targets, inputs, loss_fn, args.chunk)
        loss.backward()
        results["chunked"] = [loss.detach(), hidden.grad, weight.grad]  # type: ignore[list-item]

    def run_distill() -> None:
        loss, _ = chunked_loss(hidden, weight, None, targets, distill_inputs, distill_fn, args.chunk)
        loss.backward()

    def fresh(fn: Callable[[], None]) -> Callable[[], None]:
        def go() -> None:
            hidden.grad = weight.grad = None
            fn()
        return go

    wanted = args.paths.split(",")
    every = {"full": fresh(run_full), "chunked": fresh(run_chunked), "distill": fresh(run_distill)}
    if not wanted or set(wanted) - set(every):
        parser.error(f"--paths takes a comma-separated subset of {','.join(every)}, got {args.paths!r}")
    paths = {name: every[name] for name in dict.fromkeys(wanted)}  # measured in the order given
    print(f"device {device}, compute dtype {dtype}, T={t}, V={v}, H={h}, chunk={args.chunk}, k={args.topk}; "
          f"fp32 logits of the whole micro-batch would be {t * v * 4 / 2**30:.2f} GiB")
    peaks = {}
    for name, fn in paths.items():  # peak first (also the warmup), each from the same starting state
        hidden.grad = weight.grad = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        peaks[name] = peak_bytes(fn, device)
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.repeats):
        for name, fn in paths.items():
            times[name].append(timed(fn, device))
    for name in paths:
        timing = (f"median {statistics.median(times[name]):7.3f} s (forward + backward; runs "
                  f"{', '.join(f'{s:.3f}' for s in times[name])})") if times[name] else "not timed (--repeats 0)"
        print(f"{name:8s} peak {peaks[name] / 2**30:7.2f} GiB above inputs, {timing}")
    if args.repeats == 0:
        return
    if "full" in paths and "chunked" in paths:
        diffs = [float((a.float() - b.float()).abs().max()) for a, b in zip(results["full"], results["chunked"], strict=True)]
        print(f"max |full - chunked|: loss {diffs[0]:.2e}, grad hidden {diffs[1]:.2e}, grad W {diffs[2]:.2e}")
    for new, base in (("chunked", "full"), ("distill", "chunked")):
        if new in paths and base in paths:
            print(f"{new}/{base} peak memory ratio: {peaks[new] / peaks[base]:.3f}")
            print(f"{new}/{base} time ratio: {statistics.median(times[new]) / statistics.median(times[base]):.3f}")


def teacher_topk(t: int, v: int, k: int, mask: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    """Distinct top-k ids per position ([T, k], built without any [T, V] tensor) and logprobs leaving a tail;
    a tenth of the loss rows (and every non-loss row) without targets."""
    base = torch.randint(0, v, (t, 1), device=device)
    ids = (base + torch.arange(k, device=device) * max(1, v // k)) % v
    lps = torch.log_softmax(2.0 * torch.randn(t, k, device=device), -1) + math.log(0.9)
    none = ~mask | (torch.rand(t, device=device) < 0.1)
    return {"teacher_topk_ids": torch.where(none.unsqueeze(-1), -1, ids), "teacher_topk_logprobs": lps}


if __name__ == "__main__":
    main()
