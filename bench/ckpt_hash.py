"""Cost of checkpoint checksums: hashing a ~500 MB checkpoint, as a fraction of writing it, measured in one run.

    python bench/ckpt_hash.py [--mb 500] [--dir /tmp]

Writes a model-plus-optimizer-shaped state of --mb megabytes with torch.distributed.checkpoint (as
trainer/ckpt.py does), fsyncs it (the save's real cost), then times `handoff.manifest.write_manifest` (sha256 of every file,
read back from disk) and `ckpt.verify_checkpoint`, and hashlib's sha256/blake2b over the same bytes in memory
to show why sha256 was chosen. Last line: `manifest/save time ratio: N.NN`.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from apprentice import fsio
from apprentice.handoff.manifest import write_manifest
from apprentice.trainer import ckpt


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=500)
    parser.add_argument("--dir", default=None, help="where to write (default: the system temp dir)")
    args = parser.parse_args()

    # Weights plus two Adam moments: 3 equal parts, split into 64 MB-ish tensors like transformer layers.
    n_floats = args.mb * (1 << 20) // 4
    per_tensor = 16 << 20
    state = {
        f"{part}.{i}": torch.randn(min(per_tensor, n_floats // 3 - i * per_tensor))
        for part in ("model", "exp_avg", "exp_avg_sq")
        for i in range((n_floats // 3 + per_tensor - 1) // per_tensor)
    }
    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="ckpt-hash-bench-"))
    try:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(state, checkpoint_id=root / "state", no_dist=True)
        fsio.sync_tree(root)
        save_s = time.perf_counter() - t0
        (root / ckpt.MARKER).write_text('{"step": 1, "format": 2}')

        t0 = time.perf_counter()
        write_manifest(root, ckpt.FORMAT)
        manifest_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ckpt.verify_checkpoint(root)
        verify_s = time.perf_counter() - t0

        size_mb = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / (1 << 20)
        data = next(iter(state.values())).numpy().tobytes()
        for name in ("sha256", "blake2b"):
            t0 = time.perf_counter()
            hashlib.new(name, data).hexdigest()
            rate = len(data) / (1 << 20) / (time.perf_counter() - t0)
            print(f"in-memory {name}: {rate:.0f} MB/s")
        print(f"checkpoint size: {size_mb:.0f} MB")
        print(f"save (dcp.save + fsync): {save_s:.2f} s")
        print(f"manifest (sha256 of every file): {manifest_s:.2f} s; verify on resume: {verify_s:.2f} s")
        print(f"manifest/save time ratio: {manifest_s / save_s:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
