"""Cost of hand-off checksums (handoff/manifest.py), as a fraction of writing the hand-off, measured in one run.

    python bench/ckpt_hash.py [--mb 500] [--dir /tmp]          # a checkpoint-shaped state of --mb megabytes
    python bench/ckpt_hash.py --weights [--dir /tmp]           # published weights of SmolLM2-135M (fp32)

Checkpoint: writes a model-plus-optimizer-shaped state with torch.distributed.checkpoint (as trainer/ckpt.py
does), fsyncs it (the save's real cost), then times `write_manifest` (sha256 of every file, read back from disk)
and `ckpt.verify_checkpoint`, and hashlib's sha256/blake2b over the same bytes in memory to show why sha256.
Weights: publishes SmolLM2-135M-Instruct as the trainer does (`hfdir.write_hf_dir`: save_pretrained, tokenizer,
manifest, COMPLETE, fsync, rename; the manifest is part of it) and times the manifest alone (64 MiB chunks
hashed on a thread pool), whole-file sha256 in one thread for comparison, and `weights.verify` (the server's
check before a reload). Last line: `manifest/save time ratio: N.NN`.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from apprentice import fsio
from apprentice.handoff.manifest import file_sha256, write_manifest
from apprentice.trainer import ckpt


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def checkpoint(root: Path, mb: int) -> tuple[float, float, float]:
    """(save, manifest, verify) seconds for a --mb checkpoint-shaped state."""
    # Weights plus two Adam moments: 3 equal parts, split into 64 MB-ish tensors like transformer layers.
    n_floats = mb * (1 << 20) // 4
    per_tensor = 16 << 20
    state = {
        f"{part}.{i}": torch.randn(min(per_tensor, n_floats // 3 - i * per_tensor))
        for part in ("model", "exp_avg", "exp_avg_sq")
        for i in range((n_floats // 3 + per_tensor - 1) // per_tensor)
    }

    def save() -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(state, checkpoint_id=root / "state", no_dist=True)
        fsio.sync_tree(root)

    save_s = seconds(save)
    (root / ckpt.MARKER).write_text('{"step": 1, "format": 2}')
    manifest_s = seconds(lambda: write_manifest(root, ckpt.FORMAT))
    verify_s = seconds(lambda: ckpt.verify_checkpoint(root))
    data = next(iter(state.values())).numpy().tobytes()
    for name in ("sha256", "blake2b"):
        rate = len(data) / (1 << 20) / seconds(lambda name=name: hashlib.new(name, data).hexdigest())
        print(f"in-memory {name}: {rate:.0f} MB/s")
    return save_s, manifest_s, verify_s


def weights(root: Path) -> tuple[float, float, float]:
    """(publish, manifest, verify) seconds for SmolLM2-135M's published weights."""
    from apprentice.config import ModelConfig
    from apprentice.handoff.hfdir import FORMAT, write_hf_dir
    from apprentice.handoff.weights import verify
    from apprentice.loader import load_causal_lm
    from apprentice.testing.smollm2 import export_smollm2
    from apprentice.tokenizer import load_tokenizer

    source = export_smollm2()
    model = load_causal_lm(source, dtype=torch.float32, device="cpu")
    tokenizer = load_tokenizer(ModelConfig(name=str(source)))
    path = root / "weights" / "step_1"
    publish_s = seconds(lambda: write_hf_dir(model, tokenizer, path, step=1))
    whole_s = seconds(lambda: [file_sha256(p) for p in path.iterdir() if p.is_file()])
    print(f"whole-file sha256 of every file, one thread (the older manifests): {whole_s:.2f} s")
    return publish_s, seconds(lambda: write_manifest(path, FORMAT)), seconds(lambda: verify(path))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=500)
    parser.add_argument("--weights", action="store_true", help="published SmolLM2-135M weights instead")
    parser.add_argument("--dir", default=None, help="where to write (default: the system temp dir)")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="ckpt-hash-bench-"))
    try:
        save_s, manifest_s, verify_s = weights(root) if args.weights else checkpoint(root, args.mb)
        size_mb = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / (1 << 20)
        print(f"{'published weights' if args.weights else 'checkpoint'} size: {size_mb:.0f} MB")
        print(f"save ({'publish, manifest included' if args.weights else 'dcp.save + fsync'}): {save_s:.2f} s")
        print(f"manifest (sha256 of every file): {manifest_s:.2f} s; verify before loading: {verify_s:.2f} s")
        print(f"manifest/save time ratio: {manifest_s / save_s:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
