"""One rl weight update, trainer to server, both ways (`trainer.weight_broadcast`), measured in the same run.

    HF_HUB_OFFLINE=1 python bench/weight_update.py [--model DIR] [--repeats 3] [--threads 1]

A real `apprentice serve` process on loopback serves SmolLM2-135M-Instruct (fp32, the rl-demo's model; or
--model); this process plays the trainer with the same weights. Per update:
    filesystem  handoff.weights.publish (OUTPUT/weights/step_n, fsync'ed, sha256 manifest) + POST /v1/load_weights (the server reads it)
    collective  WeightSender.send (gloo broadcast into the server's staging copy) + POST /v1/weights/apply
Prints the mean seconds of each half and the ratio filesystem / collective.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from statistics import mean

import httpx
import torch
from transformers import AutoTokenizer

from apprentice.handoff.hfdir import full_state_dict
from apprentice.handoff.weights import publish
from apprentice.inference.launch import local_server
from apprentice.loader import load_causal_lm
from apprentice.testing.smollm2 import export_smollm2
from apprentice.trainer.broadcast import WeightSender


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server and of this process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = args.model or export_smollm2()
    model = load_causal_lm(model_dir, dtype=torch.float32, device="cpu")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    http = httpx.Client(timeout=600.0)
    times: dict[str, list[float]] = {k: [] for k in ("fs_write", "fs_load", "coll_send", "coll_apply")}
    with tempfile.TemporaryDirectory() as out, local_server(model_dir, extra_args=["--threads", str(args.threads), "--dtype", "float32"]) as url:
        sender = WeightSender(url, timeout_s=300.0)
        for step in range(1, args.repeats + 1):
            start = time.perf_counter()
            path = publish(model, tokenizer, Path(out), step, keep=2)
            times["fs_write"].append(time.perf_counter() - start)
            start = time.perf_counter()
            http.post(f"{url}/load_weights", json={"path": str(path), "step": step}).raise_for_status()
            times["fs_load"].append(time.perf_counter() - start)

            coll_step = 1000 + step
            start = time.perf_counter()
            sender.send(full_state_dict(model), coll_step)
            times["coll_send"].append(time.perf_counter() - start)
            start = time.perf_counter()
            http.post(f"{url}/weights/apply", json={"step": coll_step}).raise_for_status()
            times["coll_apply"].append(time.perf_counter() - start)
        sender.close()
    fs = mean(times["fs_write"]) + mean(times["fs_load"])
    coll = mean(times["coll_send"]) + mean(times["coll_apply"])
    print(f"{model_dir.name}, {args.repeats} updates, {args.threads} thread(s) each side")
    print("| path | trainer side (s) | server side (s) | total (s) |")
    print("|---|---|---|---|")
    print(f"| filesystem | {mean(times['fs_write']):.2f} | {mean(times['fs_load']):.2f} | {fs:.2f} |")
    print(f"| collective | {mean(times['coll_send']):.2f} | {mean(times['coll_apply']):.2f} | {coll:.2f} |")
    print(f"filesystem / collective: {fs / coll:.2f}x")


if __name__ == "__main__":
    main()
