"""Memory and time of the loss through the lm_head: full [T, V] logits vs the chunked path, in one run.

Both compute the sft loss of T target tokens from final hidden states [T, H] through an lm_head [V, H] and
run its backward (gradients of the hidden states and of the head):
    full:    logits = h W^T (all T rows), log-softmax in fp32, loss, backward   (what the trainer did before)
    chunked: trainer.logprobs.chunked_loss, --chunk rows at a time, gradients built in the forward
Peak memory is what each path adds on top of the inputs (hidden states, head weight):
    CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats (the caching allocator's own count).
    CPU:  the kernel's resident-set high-water mark (VmHWM in /proc/self/status, reset by writing 5 to
          /proc/self/clear_refs) minus the resident set before the path ran. torch's CPU allocator has no
          peak statistics and tracemalloc does not see its buffers; every buffer here is far above glibc's
          mmap threshold, so it is mapped on allocation and unmapped on free, and RSS follows live tensors.
Time is the median over --repeats runs of forward + backward, the two paths interleaved (one warmup each).

    python bench/logprobs.py [--tokens 8192] [--vocab 151936] [--hidden 1024] [--chunk 1024] [--device cpu]
Last lines: `chunked/full peak memory ratio: R` and `chunked/full time ratio: R`.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import timed  # noqa: E402  (bench/ is the script's directory)

from apprentice.config import SFTLossConfig
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
    parser.add_argument("--only", choices=["full", "chunked"], default=None,
                        help="measure one path (no ratios): e.g. the chunked path where the full one does not fit")
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
    results: dict[str, list[torch.Tensor]] = {}

    def run_full() -> None:
        loss, _ = full_loss(F.linear(hidden, weight), targets, inputs, loss_fn)
        loss.backward()
        results["full"] = [loss.detach(), hidden.grad, weight.grad]  # type: ignore[list-item]

    def run_chunked() -> None:
        loss, _ = chunked_loss(hidden, weight, None, targets, inputs, loss_fn, args.chunk)
        loss.backward()
        results["chunked"] = [loss.detach(), hidden.grad, weight.grad]  # type: ignore[list-item]

    def fresh(fn: Callable[[], None]) -> Callable[[], None]:
        def go() -> None:
            hidden.grad = weight.grad = None
            fn()
        return go

    paths = {name: fn for name, fn in {"full": fresh(run_full), "chunked": fresh(run_chunked)}.items()
             if args.only in (None, name)}
    print(f"device {device}, compute dtype {dtype}, T={t}, V={v}, H={h}, chunk={args.chunk}; "
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
    if args.only is not None or args.repeats == 0:
        return
    diffs = [float((a.float() - b.float()).abs().max()) for a, b in zip(results["full"], results["chunked"], strict=True)]
    print(f"max |full - chunked|: loss {diffs[0]:.2e}, grad hidden {diffs[1]:.2e}, grad W {diffs[2]:.2e}")
    print(f"chunked/full peak memory ratio: {peaks['chunked'] / peaks['full']:.3f}")
    print(f"chunked/full time ratio: {statistics.median(times['chunked']) / statistics.median(times['full']):.3f}")


if __name__ == "__main__":
    main()
