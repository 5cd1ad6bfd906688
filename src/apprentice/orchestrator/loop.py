"""The orchestrator process: a continuous producer of rollouts, and a writer of step batches in step order.

    producer (producer.py): up to max_concurrency rollouts in flight, across the steps the backpressure rule
                            allows (at most max_async_level steps ahead of the trainer's last finished step)
    writer (this file), for each step n in order, once all of step n's rollouts are done:
        -> rl mode: group advantages, policy/* metrics (policy.prepare_batch)
        -> set aside failed / truncated rollouts (counted by kind)
        -> render with the student tokenizer, on a worker thread (unrenderable ones counted by kind)
        -> OUTPUT/rollouts/step_n/ (atomic), metrics line, usage ledger

rl mode (policy.PolicySync is the producer's backpressure and rollout policy): step n opens once weights of
step >= n - 1 - max_async_level are published, after the server has loaded the newest ones (and after a held-out
evaluation when one is due); each rollout is tagged with the weights that sampled it, and one more than
max_off_policy_steps behind its batch is re-rolled (`rollout/stale_discarded`).

Resuming is restarting: the next step is the one after the newest complete batch on disk, and the teacher
cache answers any request already paid for. A spend cap (spend.py) stops the run after its last complete step.

Metrics per step, beyond rollout/*, render/* and the client's teacher/* counters (those count since the
previous step was written):
    teacher/inflight_mean   time-averaged requests in flight since the previous step was written
    teacher/inflight_busy   the same divided by max_concurrency
    teacher/responses, teacher/cache_hits, teacher/usage/{prompt,completion,reasoning,cached_prompt}_tokens  of this step's
                            own rollouts; teacher/usage_total/* for the whole run (and .../cost with a price table)
    perf/wait_trainer_s     seconds step n waited for the trainer before it could open (backpressure)
    perf/wait_rollouts_s    seconds the writer waited for step n's last rollout
    perf/render_s           rendering and writing the batch
    perf/sample_s           from step n opening to its last rollout done
    perf/reload_s           rl: the server's weight reload before step n opened (as the server reports it)
    perf/eval_wait_s        rl: how long the reload before step n waited for a held-out evaluation to finish
                            (evaluations run beside the rollouts; each one's own time is perf/eval_s in eval.jsonl)
    perf/step_time_s        from step n opening to its batch written
    perf/step_interval_s    since the previous batch was written
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

from apprentice.config import Config, load_config
from apprentice.config.rl import check_rl_config
from apprentice.envs.registry import load_environment
from apprentice.errors import ApprenticeError, UsageError, exit_on_user_error
from apprentice.handoff.rollouts import (
    drop_unpackable,
    latest_step_batch,
    remove_partial_steps,
    split_across_ranks,
    write_step_batch,
)
from apprentice.handoff.stop import clear_stopped, mark_stopped
from apprentice.metrics import MetricsLog, progress_bar
from apprentice.orchestrator.batch import NothingToTrainError, empty_step_message, rollout_metrics, set_aside_reason
from apprentice.orchestrator.client import build_client
from apprentice.orchestrator.evaluate import due, eval_policy
from apprentice.orchestrator.metered import MeteredClient
from apprentice.orchestrator.on_policy import OnPolicyDistiller
from apprentice.orchestrator.policy import PolicySync, prepare_batch
from apprentice.orchestrator.producer import Backpressure, Producer, RolloutPolicy, StepRollouts, TrainerBackpressure
from apprentice.orchestrator.scheduler import TaskScheduler
from apprentice.orchestrator.soft_targets import StudentVocab, probe_top_logprobs, render_with_soft_targets
from apprentice.orchestrator.spend import SpendCapReached, SpendLedger
from apprentice.render import render_many
from apprentice.tokenizer import load_tokenizer
from apprentice.trajectory import Trajectory
from apprentice.types import TrainingSample

__all__ = ["NothingToTrainError", "main", "run"]

log = logging.getLogger("apprentice.orchestrator")


def usage_path(output_dir: Path) -> Path:
    return output_dir / "orchestrator" / "usage.json"


def load_student_tokenizer(cfg: Config) -> Any:
    try:
        return load_tokenizer(cfg.model)
    except OSError as e:  # transformers' "not a local folder and not a valid model identifier" and kin
        source = cfg.model.tokenizer or cfg.model.name
        raise UsageError(
            f"cannot load the student tokenizer from {source!r} (model.tokenizer / model.name): {str(e).splitlines()[0]} "
            f"Fix: point model.name at a local model directory or a Hugging Face id available offline"
        ) from None


ScoreFn = Callable[[list[TrainingSample], list[Trajectory]], tuple[list[TrainingSample], dict[str, float], dict[str, str]]]
"""On-policy distillation's hook: rendered samples and their trajectories -> (the scored ones with token_advantages,
distill/* metrics, the scoring teacher's first error message per kind of this step)."""


def write_step(cfg: Config, tokenizer: Any, done: StepRollouts, score: ScoreFn | None = None,
               vocab: StudentVocab | None = None) -> dict[str, float]:  # fmt: skip
    """Set aside, render, (score with the teacher,) write one step's batch (runs on the worker thread); its
    rollout/render/distill metrics."""
    rl_metrics = prepare_batch(done.trajectories, done.step, cfg) if cfg.mode == "rl" else {}
    dropped: Counter[str] = Counter()
    kept: list[Trajectory] = []
    for trajectory in done.trajectories:
        reason = set_aside_reason(trajectory, cfg.orchestrator.truncated, token_path=cfg.orchestrator.use_token_client)
        if reason is None:
            kept.append(trajectory)
        else:
            dropped[reason] += 1
    # A Trajectory is a dict; render_many is annotated with the plain dict type it has always accepted.
    render_kwargs: dict[str, Any] = {"reasoning": cfg.orchestrator.reasoning,
                                     "allow_control_tokens": cfg.orchestrator.allow_control_tokens,
                                     "tool_call_arguments": cfg.orchestrator.tool_call_arguments}  # fmt: skip
    topk_metrics: dict[str, float] = {}
    if vocab is not None:  # off-policy soft targets from the teacher's top_logprobs (orchestrator/soft_targets.py)
        samples, render_stats, coverage = render_with_soft_targets(
            cast(list[dict[str, Any]], kept), tokenizer, vocab, cfg.orchestrator.sampling.top_logprobs, **render_kwargs
        )
        topk_metrics = coverage.metrics()
    else:
        samples, render_stats = render_many(cast(list[dict[str, Any]], kept), tokenizer, **render_kwargs)
    # A sample the trainer cannot pack is never written: a stored batch must not stop every rerun.
    samples, too_long = drop_unpackable(samples, cfg.trainer.micro_batch_tokens)
    render_metrics = render_stats.metrics() | {"render/set_aside/too_long": float(too_long)} | topk_metrics
    scoring_errors: dict[str, str] = {}
    if score is not None:
        samples, distill_metrics, scoring_errors = score(samples, kept)
        render_metrics |= distill_metrics
    if not samples:
        message = empty_step_message(done.step, done.trajectories, dropped, render_metrics, cfg, scoring_errors)
        raise NothingToTrainError(message)
    tasks = [f"{t['env']}/{t['task_id']}" for t in done.trajectories]
    write_step_batch(Path(cfg.output_dir), done.step, split_across_ranks(samples, cfg.trainer.world_size), {"tasks": tasks})
    metrics = rollout_metrics(done.trajectories, dropped) | render_metrics | rl_metrics
    if done.discarded:
        metrics["rollout/stale_discarded"] = float(done.discarded)
    return metrics


async def run(cfg: Config) -> None:
    orch = cfg.orchestrator
    output_dir = Path(cfg.output_dir)
    if cfg.mode == "rl":
        check_rl_config(cfg)
    envs = [load_environment(env_cfg, seed=cfg.seed) for env_cfg in orch.env]  # a missing data file fails first
    tokenizer = load_student_tokenizer(cfg)
    clear_stopped(output_dir)  # this attempt writes on (the launcher clears it too, before the trainer starts)
    if removed := remove_partial_steps(output_dir):  # a killed run's half-written steps: rewritten below
        log.info("removed %d partial rollouts step directories left by an earlier run: %s", len(removed), removed)
    first, last = latest_step_batch(output_dir) + 1, cfg.trainer.max_steps
    # The paid endpoint: distill mode's teacher (rollout_model) or on-policy distillation's (teacher_model).
    paid, section = ((orch.teacher_model, "orchestrator.teacher_model") if orch.teacher_model is not None
                     else (orch.rollout_model, "orchestrator.rollout_model"))  # fmt: skip
    ledger = SpendLedger(usage_path(output_dir), paid, section)
    if first <= last and (reason := ledger.exhausted()) is not None:
        raise SpendCapReached(f"{reason}; nothing was sent. {_resume_hint(first, section)}")
    distiller = None  # on-policy distillation: the teacher scores every sampled token (orchestrator/on_policy.py);
    # it is probed first (tokenizer, protocol, noise): a config mistake should fail before anything else waits
    if orch.teacher_model is not None:
        distiller = OnPolicyDistiller(orch.teacher_model, orch.on_policy_distill, max_concurrency=orch.max_concurrency,
                                      cache_dir=output_dir / "teacher_cache", budget=ledger)  # fmt: skip
        try:
            await distiller.probe(tokenizer)
        except SpendCapReached as e:
            raise SpendCapReached(f"{e}, during the startup probe of the teacher. {_resume_hint(first, section)}") from None
        finally:
            ledger.save()  # the probe's requests are paid too
    scheduler = TaskScheduler(envs, [e.weight for e in orch.env], orch.tasks_per_step, orch.rollouts_per_prompt, orch.seed)
    # rl mode samples from the student's own server: not paid, so its usage stays off the teacher's ledger.
    client = MeteredClient(build_client(cfg), ledger if orch.rollout_model is not None else None)
    vocab = None  # off-policy soft targets: the teacher's tokens must map onto the student's (probed once)
    if orch.rollout_model is not None and orch.sampling.top_logprobs:
        vocab = StudentVocab(tokenizer)
        await probe_top_logprobs(client, vocab, orch.sampling.top_logprobs, orch.rollout_model.base_url)
    policy, eval_log = None, None
    if cfg.mode == "rl":
        if orch.eval_interval:
            eval_log = MetricsLog(output_dir / "orchestrator" / "eval.jsonl", cfg.log, resume_after=first - 1, use_wandb=False)
        policy = PolicySync(cfg, on_step=_evaluator(cfg, eval_log))
        await policy.wait_ready()
    backpressure: Backpressure = policy or TrainerBackpressure(output_dir, orch.max_async_level)
    rollout_policy: RolloutPolicy | None = policy
    producer = Producer(envs, scheduler, client, max_concurrency=orch.max_concurrency, ledger=ledger,
                        backpressure=backpressure, policy=rollout_policy)  # fmt: skip
    # wandb: the trainer logs these lines to the run's one wandb run (see apprentice.metrics).
    metrics_log = MetricsLog(output_dir / "orchestrator" / "metrics.jsonl", cfg.log, resume_after=first - 1, use_wandb=False)
    if first > 1:
        log.info("resuming: steps 1..%d are already written, continuing at step %d", first - 1, first)
    bar = iter(progress_bar(range(first, last + 1), cfg.log, desc="orchestrator", unit="step"))
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="render")  # one thread: the tokenizer is not shared
    loop = asyncio.get_running_loop()
    score: ScoreFn | None = None
    if distiller is not None:  # the render thread hands the samples to the event loop, where the scoring client lives
        scorer = distiller

        def score_on_loop(samples: list[TrainingSample], trajectories: list[Trajectory]
                          ) -> tuple[list[TrainingSample], dict[str, float], dict[str, str]]:  # fmt: skip
            kept, metrics = asyncio.run_coroutine_threadsafe(
                scorer.apply(samples, cast(list[dict[str, Any]], trajectories)), loop).result()
            return kept, metrics, dict(scorer.first_errors)

        score = score_on_loop
    area, written_at = client.meter.area()
    next(bar, None)
    try:
        async with contextlib.aclosing(producer.steps(first, last)) as steps:
            waiting_since = time.monotonic()
            async for done in steps:
                ready_at = time.monotonic()
                metrics: dict[str, float] = {"step": done.step}
                metrics.update(await loop.run_in_executor(worker, write_step, cfg, tokenizer, done, score, vocab))
                now_area, now = client.meter.area()
                interval = max(now - written_at, 1e-9)
                metrics.update(client.metrics(reset=True))
                metrics.update(done.account.metrics())
                if paid is not None:
                    metrics.update(ledger.metrics())
                metrics["teacher/inflight_mean"] = (now_area - area) / interval
                metrics["teacher/inflight_busy"] = metrics["teacher/inflight_mean"] / orch.max_concurrency
                metrics["perf/wait_trainer_s"] = done.wait_trainer_s
                metrics["perf/wait_rollouts_s"] = ready_at - waiting_since
                metrics["perf/render_s"] = now - ready_at
                metrics["perf/sample_s"] = done.sample_s
                if policy is not None:
                    metrics.update(policy.take_phases(done.step))
                metrics["perf/step_time_s"] = now - done.opened_at
                metrics["perf/step_interval_s"] = interval
                area, written_at, waiting_since = now_area, now, now
                ledger.save()
                metrics_log.write(metrics)
                next(bar, None)
        if policy is not None:
            await policy.finish_evaluation()
        if policy is not None and eval_log is not None:  # the final weights' score closes the curve
            await policy.reload_newest(last, last + 1)
            evaluated = time.monotonic()
            scores = await eval_policy(cfg)
            eval_log.write({"step": last + 1, "policy/step": policy.policy_step(), **scores,
                            "perf/eval_s": time.monotonic() - evaluated})  # fmt: skip
    except SpendCapReached as e:
        done_step = latest_step_batch(output_dir)
        raise SpendCapReached(f"{e}; stopped after step {done_step}, the last complete one. "
                              f"{_resume_hint(done_step + 1, section)}") from None  # fmt: skip
    finally:
        ledger.save()
        metrics_log.close()
        worker.shutdown(wait=True)
        if eval_log is not None:
            eval_log.close()
        if policy is not None:
            await policy.aclose()
        if distiller is not None:
            await distiller.aclose()
        await client.aclose()


def _evaluator(cfg: Config, eval_log: MetricsLog | None) -> Callable[[int, int], Coroutine[Any, Any, None]] | None:
    """rl mode: the held-out evaluation run before step n opens, when due (one line in eval.jsonl)."""
    if eval_log is None:
        return None

    async def evaluate(step: int, policy_step: int) -> None:
        if due(cfg, step):
            evaluated = time.monotonic()
            scores = await eval_policy(cfg)
            eval_log.write({"step": step, "policy/step": policy_step, **scores, "perf/eval_s": time.monotonic() - evaluated})

    return evaluate


def _resume_hint(step: int, section: str) -> str:
    return (
        f"Raise {section}.max_tokens_total (or max_cost) and rerun the same command to resume at "
        f"step {step}; answers already paid for come from OUTPUT/teacher_cache"
    )


def main(cfg: Config) -> None:
    logging.basicConfig(level=cfg.log.level, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "httpx2", "openai"):  # one INFO line per request drowns the step log
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        asyncio.run(run(cfg))
    except SpendCapReached as e:  # a clean stop, not a failure: the trainer trains the written steps, then exports
        mark_stopped(Path(cfg.output_dir), latest_step_batch(Path(cfg.output_dir)), "teacher spend cap")
        log.warning("stopped: %s", e)
        sys.exit(e.exit_code)
    except ApprenticeError as e:  # an expected failure (teacher down, every turn truncated): say why, no traceback
        log.error("%s", e)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    exit_on_user_error(lambda: main(load_config(sys.argv[1:2], sys.argv[2:])))
