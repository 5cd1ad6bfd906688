"""Teacher utilisation: the old step-by-step orchestrator loop vs the continuous producer, measured in one run.

A stand-in hosted teacher on loopback answers each request after a heavy-tailed delay (lognormal: median
--median-s, sigma --sigma; drawn from the request's per-rollout seed, so both loops see the same delay for the
same rollout). The trainer stand-in marks every written step as trained at once: it is never the bottleneck.
Both loops run --steps steps of --batch-size single-turn reverse-text rollouts with max_concurrency
--concurrency and max_async_level --async-level, render with the tiny student's tokenizer and write real
step batches.
    old:  step n's rollouts all gathered before step n+1 starts; rendering on the event-loop thread
          (the policy of orchestrator/loop.py before the producer; reimplemented here, used nowhere else)
    new:  apprentice.orchestrator.loop.run (the producer)
Busy fraction = time-averaged requests in flight / max_concurrency, from the first step's start to the last
step's write (for the new loop, from its per-step teacher/inflight_mean and perf/step_interval_s).

    python bench/orchestrator.py [--steps 40] [--batch-size 16] [--concurrency 16] [--async-level 4]
Last line: `busy fraction: old 0.NN, new 0.NN`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from apprentice.config import Config  # noqa: E402
from apprentice.envs.registry import load_environment  # noqa: E402
from apprentice.handoff.progress import write_trainer_progress  # noqa: E402
from apprentice.handoff.rollouts import latest_step_batch, split_across_ranks, write_step_batch  # noqa: E402
from apprentice.metrics import read_metrics  # noqa: E402
from apprentice.orchestrator.batch import rollout_one  # noqa: E402
from apprentice.orchestrator.client import build_client  # noqa: E402
from apprentice.orchestrator.loop import run  # noqa: E402
from apprentice.orchestrator.metered import MeteredClient  # noqa: E402
from apprentice.orchestrator.producer import TrainerBackpressure  # noqa: E402
from apprentice.orchestrator.scheduler import TaskScheduler  # noqa: E402
from apprentice.render import render_many  # noqa: E402
from apprentice.testing.tiny import save_tiny_student  # noqa: E402
from apprentice.tokenizer import load_tokenizer  # noqa: E402


class LognormalTeacher:
    """An OpenAI-compatible chat endpoint that reverses the last user message after a lognormal delay."""

    def __init__(self, median_s: float, sigma: float) -> None:
        self.median_s, self.sigma = median_s, sigma
        teacher = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                time.sleep(teacher.delay_s(int(body.get("seed", 0))))
                text = str(body["messages"][-1]["content"])[::-1]
                data = json.dumps({
                    "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20},
                }).encode()  # fmt: skip
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def delay_s(self, seed: int) -> float:
        return self.median_s * math.exp(self.sigma * random.Random(seed).gauss(0.0, 1.0))

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> LognormalTeacher:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class InstantTrainer:
    """Marks every complete step batch as trained as soon as it appears (a trainer that is never the bottleneck)."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        done = 0
        while not self.stop.is_set():
            latest = latest_step_batch(self.output_dir)
            if latest > done:
                write_trainer_progress(self.output_dir, latest)
                done = latest
            time.sleep(0.01)

    def __enter__(self) -> InstantTrainer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def make_config(output: Path, student: Path, base_url: str, args: argparse.Namespace) -> Config:
    return Config.model_validate({
        "output_dir": str(output), "model": {"name": str(student)}, "log": {"progress": False},
        "orchestrator": {
            "batch_size": args.batch_size, "max_concurrency": args.concurrency, "max_async_level": args.async_level,
            "use_token_client": False, "rollout_model": {"base_url": base_url, "model": "teacher", "max_retries": 0},
            "sampling": {"max_tokens": 64, "seed": 0}, "env": [{"id": "reverse-text", "args": {"num_tasks": 2000}}],
        },
        "trainer": {"max_steps": args.steps, "loss": {"type": "sft"}},
    })  # fmt: skip


async def old_step_by_step(cfg: Config) -> float:
    """The pre-producer policy: gather all of step n, render on the loop thread, write, then step n+1. Busy fraction."""
    orch, output_dir = cfg.orchestrator, Path(cfg.output_dir)
    tokenizer = load_tokenizer(cfg.model)
    envs = [load_environment(e, seed=cfg.seed) for e in orch.env]
    scheduler = TaskScheduler(envs, [e.weight for e in orch.env], orch.tasks_per_step, orch.rollouts_per_prompt, orch.seed)
    client = MeteredClient(build_client(cfg))
    backpressure = TrainerBackpressure(output_dir, orch.max_async_level)
    area0, t0 = client.meter.area()
    for step in range(1, cfg.trainer.max_steps + 1):
        await backpressure.wait(step)
        slots = scheduler.step(step)
        trajectories = await asyncio.gather(*(rollout_one(envs[s.env_index], s, client, step) for s in slots))
        samples, _ = render_many(cast(list[dict[str, Any]], list(trajectories)), tokenizer)
        write_step_batch(output_dir, step, split_across_ranks(samples, cfg.trainer.num_processes))
    area1, t1 = client.meter.area()
    await client.aclose()
    return (area1 - area0) / (t1 - t0) / orch.max_concurrency


def new_busy_fraction(output_dir: Path, concurrency: int) -> tuple[float, float]:
    rows = read_metrics(output_dir / "orchestrator" / "metrics.jsonl")
    wall = sum(r["perf/step_interval_s"] for r in rows)
    return sum(r["teacher/inflight_mean"] * r["perf/step_interval_s"] for r in rows) / wall / concurrency, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--async-level", type=int, default=4)
    parser.add_argument("--median-s", type=float, default=0.25)
    parser.add_argument("--sigma", type=float, default=1.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, LognormalTeacher(args.median_s, args.sigma) as teacher:
        student = save_tiny_student(Path(tmp) / "student")
        print(f"stand-in teacher: lognormal latency, median {args.median_s} s, sigma {args.sigma}; {args.steps} steps x "
              f"{args.batch_size} rollouts, max_concurrency {args.concurrency}, max_async_level {args.async_level}")  # fmt: skip
        results = {}
        for name in ("old", "new"):
            cfg = make_config(Path(tmp) / name, student, teacher.base_url, args)
            with InstantTrainer(Path(cfg.output_dir)):
                start = time.monotonic()
                if name == "old":
                    busy = asyncio.run(old_step_by_step(cfg))
                else:
                    asyncio.run(run(cfg))
                    busy, _ = new_busy_fraction(Path(cfg.output_dir), args.concurrency)
                wall = time.monotonic() - start
            results[name] = busy
            label = "old step-by-step loop" if name == "old" else "continuous producer  "
            print(f"{label}: busy fraction {busy:.2f}, wall {wall:.1f} s")
    print(f"busy fraction: old {results['old']:.2f}, new {results['new']:.2f}")


if __name__ == "__main__":
    main()
