"""The trainer process: read step batches, compute the loss, step the optimizer, checkpoint, export.

    python -m apprentice.trainer.train CONFIG.toml [--key value ...]                      # one process
    torchrun --nproc-per-node 2 -m apprentice.trainer.train CONFIG.toml [...]            # FSDP2 over 2 ranks
    torchrun --nnodes N --rdzv-backend c10d --rdzv-endpoint HOST:PORT ...                # several machines
                                                                        (docs/multinode.md)

Optimizer step n consumes OUTPUT/rollouts/step_{n}/; OUTPUT/checkpoints/step_{n}/ is the state after it; its
metrics line carries "step": n. A restarted run resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.fsdp import FSDPModule

from apprentice.config import Config, ConfigError, load_config
from apprentice.config.rl import weight_broadcast
from apprentice.errors import exit_on_user_error
from apprentice.handoff import weights
from apprentice.handoff.hfdir import export_final
from apprentice.handoff.progress import write_trainer_progress
from apprentice.handoff.rollouts import (
    BatchError,
    drop_unpackable,
    rank_file,
    read_step_batch,
    read_step_marker,
    step_batch_has_topk,
    step_dir,
    wait_for_step_batch,
)
from apprentice.handoff.stop import RunStopped
from apprentice.tokenizer import load_tokenizer
from apprentice.trainer import attention, ckpt
from apprentice.trainer.broadcast import send_weights, weight_sender
from apprentice.trainer.logprobs import LOSS_METHOD
from apprentice.trainer.losses import LossFn, build_loss, finalize_metrics
from apprentice.trainer.metrics import MetricsLogger
from apprentice.trainer.model import load_model
from apprentice.trainer.optim import NonFiniteError, build_optimizer, build_scheduler, clip_grad_norm
from apprentice.trainer.packing import MicroBatch, pack_samples, placeholder_batch
from apprentice.trainer.parallelize import needs_mesh, parallelize
from apprentice.trainer.precision import resolve_precision
from apprentice.trainer.world import World, all_reduce_sum_, init_distributed, pick_device, shutdown, step_counts
from apprentice.types import TrainingSample

log = logging.getLogger("apprentice.trainer")


@dataclass
class StepResult:
    metrics: dict[str, float]
    """Summed over micro-batches and ranks, finalised (loss/*), plus loss/total."""
    grad_norm: float
    tokens: int
    """Real (non-pad) tokens processed by all ranks."""
    pad_tokens: int


def main(cfg: Config) -> None:
    world = World.from_env()
    device = pick_device(cfg.trainer.device, world)
    precision = resolve_precision(cfg.trainer, cfg.model, device)
    mesh = init_distributed(world, device, mesh=needs_mesh(precision, world.world_size))
    torch.manual_seed(cfg.seed)
    if cfg.trainer.threads is not None:  # every command (apprentice rl also sets OMP_NUM_THREADS to its budget)
        torch.set_num_threads(cfg.trainer.threads)
    output_dir = Path(cfg.output_dir)
    # One process: checkpoints are written by a thread while training goes on (ckpt.BackgroundCheckpointer).
    checkpointer = None if world.distributed else ckpt.BackgroundCheckpointer()
    try:
        # Model (fp32 master weights unless pure bf16), parallelism recipe, optimizer.
        model = load_model(cfg.model, device, precision.param_dtype)
        # Token ids the model can embed: [0, rows).
        rows = int(getattr(model.get_input_embeddings(), "num_embeddings", 0) or model.config.get_text_config().vocab_size)
        parallelize(model, cfg, mesh, precision)
        tokenizer = load_tokenizer(cfg.model)
        if len(tokenizer) > rows:  # ids past the embedding would fail their step (check_token_ids says so)
            log.warning("the tokenizer has %d tokens but the model's embedding has %d rows: ids >= %d cannot be "
                        "trained. model.tokenizer should be the model's own tokenizer (or resize the model's "
                        "embeddings to the tokenizer and save it)", len(tokenizer), rows, rows)  # fmt: skip
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(params, cfg.trainer.optim)
        scheduler = build_scheduler(optimizer, cfg.trainer.optim, cfg.trainer.max_steps)
        loss_fn = build_loss(cfg.trainer.loss)

        # Resume from the newest complete checkpoint that passes verification, if any.
        ckpt.remove_partial(output_dir, world)
        start_step = ckpt.resume(output_dir, model, optimizer, scheduler, world)
        if start_step > cfg.trainer.max_steps:  # exporting it as final/ would pass off a longer run as this one
            raise ConfigError(
                f"{output_dir}/checkpoints/step_{start_step} is past trainer.max_steps = {cfg.trainer.max_steps}: this "
                f"run already trained {start_step} steps. Raise trainer.max_steps to go on, or use a new output_dir "
                f"for a shorter run"
            )
        weights_keep = max(cfg.trainer.weights_keep, cfg.orchestrator.max_async_level + 2)
        if cfg.mode == "rl":  # an orchestrator may be waiting for the weights of the step we resume from
            weights.republish(model, tokenizer, output_dir, start_step, weights_keep)
        logger = MetricsLogger(
            output_dir, cfg.log, enabled=world.is_main, start_step=start_step, max_steps=cfg.trainer.max_steps,
            run_config=cfg.model_dump(mode="json"),
        )

        collective = cfg.mode == "rl" and weight_broadcast(cfg) == "collective"
        sender = weight_sender(cfg) if collective and world.is_main else None

        # The step loop.
        published: Path | None = None  # the last weights this process published (rl mode)
        last_step = start_step  # the newest step trained (and, once the loop ends, checkpointed)
        save = checkpointer.save if checkpointer is not None else ckpt.save_checkpoint
        for step in range(start_step + 1, cfg.trainer.max_steps + 1):
            t_wait = time.perf_counter()
            try:
                samples = read_rank_batch(output_dir, step, world, cfg.trainer.batch_timeout_s)
            except RunStopped as stop:  # a spend cap: the written steps are trained; keep them and export
                log.warning("%s: checkpointing step %d and exporting OUTPUT/final; rerun the same command to "
                            "go on once the cause is fixed", stop, last_step)  # fmt: skip
                if last_step > start_step and last_step % cfg.trainer.ckpt.interval != 0:
                    save(output_dir, last_step, model, optimizer, scheduler, world, cfg.trainer.ckpt.keep)
                published = None  # rl, collective: the last weights on disk may be older than last_step's
                break
            samples, skipped = skip_unpackable(samples, cfg.trainer.micro_batch_tokens, output_dir, step, world)
            check_token_ids(samples, rows, output_dir, step)
            if cfg.trainer.loss.type == "distill":
                check_distill_targets(samples, output_dir, step)
            t_start = time.perf_counter()
            result = train_step(model, samples, loss_fn, params, world, device, micro_batch_tokens=cfg.trainer.micro_batch_tokens,
                                grad_clip=cfg.trainer.grad_clip, logprob_chunk_tokens=cfg.trainer.logprob_chunk_tokens,
                                skipped_samples=skipped)  # fmt: skip
            check_finite(step, result, output_dir, samples, checkpointer, world.world_size)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - t_start
            phases = {"perf/train_s": elapsed}  # forward, backward and optimizer
            if cfg.mode == "rl":  # before the checkpoint: a resumed run always finds the weights of its checkpoint
                t_publish = time.perf_counter()
                # collective: to the server's memory, and to disk only where a checkpoint follows (resume reads it)
                sent = collective and send_weights(sender, model, step)
                if not sent or step % cfg.trainer.ckpt.interval == 0 or step == cfg.trainer.max_steps:
                    published = weights.publish(model, tokenizer, output_dir, step, weights_keep)
                phases["perf/publish_s"] = time.perf_counter() - t_publish
            logger.log(step, {
                **result.metrics,
                "lr": lr,
                "grad_norm": result.grad_norm,
                "perf/tokens_per_s": result.tokens / elapsed,
                "perf/padding_fraction": result.pad_tokens / max(1, result.tokens + result.pad_tokens),
                "perf/step_s": elapsed,
                "perf/wait_s": t_start - t_wait,
                **phases,
            })  # before the checkpoint: a line of a step that is not checkpointed yet is redone on resume
            if step % cfg.trainer.ckpt.interval == 0 or step == cfg.trainer.max_steps:
                save(output_dir, step, model, optimizer, scheduler, world, cfg.trainer.ckpt.keep)
            if world.is_main:
                write_trainer_progress(output_dir, step)
            last_step = step

        # The last step's published weights are the final model: final/ links to their files (rank 0's path).
        if last_step > 0:  # not the untouched initial model, when a stop came before any step
            export_final(model, tokenizer, output_dir, same_as=published if cfg.mode == "rl" and world.world_size == 1 else None)
        if checkpointer is not None:
            checkpointer.wait()  # the last checkpoint is complete before the trainer reports success
        logger.close()
    except BaseException:
        if checkpointer is not None:  # a checkpoint being written completes: it is the one a rerun resumes from
            checkpointer.settle()
        shutdown(world, completed=False)
        raise
    shutdown(world, completed=True)


def read_rank_batch(output_dir: Path, step: int, world: World, timeout_s: float) -> list[TrainingSample]:
    """This rank's samples of step `step`, after checking the batch was split for this many ranks."""
    samples = wait_for_step_batch(output_dir, step, world.rank, timeout_s)
    marker = read_step_marker(output_dir, step)
    if marker is not None and marker["world_size"] != world.world_size:
        raise BatchError(
            f"{output_dir}/rollouts/step_{step} was split for {marker['world_size']} rank(s) but the trainer runs "
            f"{world.world_size}; set trainer.num_processes = {world.world_size} for the orchestrator too (it splits "
            f"for trainer.num_nodes x trainer.num_processes ranks)"
        )
    return samples


def first_foreign_id(samples: list[TrainingSample], rows: int) -> str | None:
    """Where this rank's batch holds a token id, or a teacher top-k id, outside [0, rows) (-1, a top-k row's
    padding, is allowed there), or None."""
    for i, s in enumerate(samples):
        if s.token_ids and not 0 <= min(s.token_ids) <= max(s.token_ids) < rows:
            t, token = next((t, v) for t, v in enumerate(s.token_ids) if not 0 <= v < rows)
            return f"sample {i}, position {t} holds token id {token}"
        for t, row in enumerate(s.teacher_topk_ids or []):
            if row and not -1 <= min(row) <= max(row) < rows:
                token = next(v for v in row if not -1 <= v < rows)
                return f"sample {i}, position {t} holds teacher top-k id {token}"
    return None


def check_token_ids(samples: list[TrainingSample], rows: int, output_dir: Path, step: int) -> None:
    """A BatchError naming the step batch when it holds an id the model has no embedding row for (ids made by
    another tokenizer), before the forward pass would fail on it with a bare IndexError (a device-side assert on
    GPU); the batch would fail the same way on every rerun."""
    where = first_foreign_id(samples, rows)
    if where is None:
        return
    batch = step_dir(output_dir, step)
    raise BatchError(
        f"{batch}: {where}, but the model's embedding has {rows} rows: those ids come from another vocabulary "
        f"(model.tokenizer must be the model's own tokenizer; an on-policy teacher's top-k ids must be the "
        f"student's). Delete {batch} and every later rollouts/step_* directory, fix the cause, then rerun"
    )


def check_distill_targets(samples: list[TrainingSample], output_dir: Path, step: int) -> None:
    """The distill loss needs top-k targets somewhere in the step (any rank's file): a BatchError otherwise,
    since training on the NLL alone would silently be the sft loss."""
    if any(s.teacher_topk_ids is not None for s in samples) or step_batch_has_topk(output_dir, step):
        return
    raise BatchError(
        f'{step_dir(output_dir, step)} carries no top-k targets but trainer.loss.type = "distill": its orchestrator '
        f"wrote no teacher distributions. Set orchestrator.on_policy_distill.top_k or orchestrator.sampling."
        f'top_logprobs > 0 for the run that writes the batches, or use trainer.loss.type = "sft"'
    )


def skip_unpackable(
    samples: list[TrainingSample], micro_batch_tokens: int, output_dir: Path, step: int, world: World
) -> tuple[list[TrainingSample], int]:
    """Drop samples no micro-batch can hold (a batch stored under a larger limit), so a rerun is never stuck
    on it; each rank warns for its own file. Returns the kept samples and this rank's count (train_step sums
    the counts over ranks with the step's metrics, as loss/skipped_samples)."""
    kept, dropped = drop_unpackable(samples, micro_batch_tokens)
    if dropped:
        log.warning(
            "%s/rank_%d.safetensors: skipped %d sample(s) that are empty or longer than trainer.micro_batch_tokens "
            "= %d (written under another limit?); counted as loss/skipped_samples",
            step_dir(output_dir, step), world.rank, dropped, micro_batch_tokens,
        )
    return kept, dropped


def train_step(
    model: torch.nn.Module,
    samples: list[TrainingSample],
    loss_fn: LossFn,
    params: list[torch.nn.Parameter],
    world: World,
    device: torch.device,
    *,
    micro_batch_tokens: int,
    grad_clip: float,
    logprob_chunk_tokens: int,
    skipped_samples: int = 0,
) -> StepResult:
    """Forward/backward over this rank's packed micro-batches, then clip. Does not step the optimizer.

    `model` has been through `parallelize`. Every rank runs the same number of micro-batches (padding with a
    one-token placeholder) so that FSDP2's collectives line up, and runs backward even when it has no loss
    tokens. Losses and metrics stay on the device until the end: the host reads them once per step.
    """
    # Samples sharing a prompt compute it once where the attention reads the shared-prefix layout (ours).
    share = getattr(getattr(model, "config", None), "_attn_implementation", None) == attention.NAME
    micro_batches: list[MicroBatch] = pack_samples(samples, micro_batch_tokens, share_prompts=share)
    local_loss_tokens = sum(mb.num_loss_tokens for mb in micro_batches)  # host tensors: no device sync
    num_micro, global_loss_tokens = step_counts(max(1, len(micro_batches)), local_loss_tokens, device, world)
    micro_batches += [placeholder_batch() for _ in range(num_micro - len(micro_batches))]
    normaliser = max(1, global_loss_tokens)
    micro_batch_loss = getattr(model, LOSS_METHOD)

    sums: dict[str, torch.Tensor] = {}
    for i, mb in enumerate(micro_batches):
        if isinstance(model, FSDPModule):
            model.set_requires_gradient_sync(i == num_micro - 1)  # reduce-scatter once, after the last one
        loss, metrics = micro_batch_loss(mb.to(device), loss_fn, normaliser, logprob_chunk_tokens)
        loss.backward()
        for name, value in {**metrics, "loss/total": loss}.items():
            sums[name] = sums.get(name, 0.0) + value.detach().double()

    grad_norm = clip_grad_norm(params, grad_clip)
    names = sorted(sums)
    real = sum(mb.num_tokens + mb.num_shared_tokens - mb.num_pad_tokens for mb in micro_batches)
    pad = sum(mb.num_pad_tokens for mb in micro_batches)
    counts = torch.tensor([skipped_samples, real, pad], dtype=torch.float64, device=device)
    reduced = all_reduce_sum_(torch.cat([torch.stack([sums[n] for n in names]), counts]), world)
    values = torch.cat([reduced, grad_norm.detach().double().reshape(1)]).tolist()  # the step's one read
    step_metrics = finalize_metrics(dict(zip(names, values[: len(names)], strict=True)))
    step_metrics["loss/skipped_samples"] = values[-4]
    return StepResult(step_metrics, values[-1], int(values[-3]), int(values[-2]))


def first_non_finite(samples: list[TrainingSample]) -> str | None:
    """Where this rank's batch holds a NaN/inf (advantage, a loss token's logprob or token advantage), or None."""
    for i, s in enumerate(samples):
        if not math.isfinite(s.advantage):
            return f"sample {i} has advantage {s.advantage}"
        for name, values in (("logprobs", s.logprobs), ("token_advantages", s.token_advantages or [])):
            bad = next((v for v, m in zip(values, s.loss_mask, strict=False) if m and not math.isfinite(v)), None)
            if bad is not None:
                return f"sample {i} has {name} value {bad}"
    return None


def check_finite(step: int, result: StepResult, output_dir: Path, samples: list[TrainingSample],
                 checkpointer: ckpt.BackgroundCheckpointer | None = None, world_size: int = 1) -> None:  # fmt: skip
    """Stop before a NaN/inf update reaches the weights; the last complete checkpoint stays as it is. The message
    names the step batch, and says to delete it when it holds the non-finite values (a rerun would read it again).
    Every rank gives the same verdict: the loss is all-reduced, so a NaN in any rank's file is looked for in all of
    them (rank 0's clean file once told the user to lower the learning rate while rank 1's held the NaN)."""
    loss = result.metrics["loss/total"]
    if math.isfinite(loss) and math.isfinite(result.grad_norm):
        return
    if checkpointer is not None:  # a checkpoint still being written is the last good one: finish it, then name it
        checkpointer.settle()  # a failed write is logged; the non-finite step is the error this run reports
    last = ckpt.latest_checkpoint(output_dir)
    batch = step_dir(output_dir, step)
    if world_size == 1:
        where = first_non_finite(samples)
    else:  # only on this failure path: every rank reads every rank's file
        found = ((rank, first_non_finite(read_step_batch(output_dir, step, rank))) for rank in range(world_size))
        where = next((f"{rank_file(output_dir, step, rank).name}: {w}" for rank, w in found if w is not None), None)
    if where is not None:
        cause = (
            f"The step batch {batch} holds non-finite values ({where}): every rerun reads it again. Delete {batch} "
            f"and every later rollouts/step_* directory, then rerun: the orchestrator writes them again"
        )
    else:
        cause = (
            f"The step batch {batch} is finite, so the model diverged: lower trainer.optim.lr (or "
            f"raise trainer.grad_clip), delete {batch} and later rollouts/step_* if you change the data, and rerun"
        )
    raise NonFiniteError(
        f"step {step}: non-finite loss ({loss}) or gradient norm ({result.grad_norm}); the update was not applied. "
        f"Last good checkpoint: {last or 'none yet'} (a rerun resumes from it). {cause}."
    )


if __name__ == "__main__":
    exit_on_user_error(lambda: main(load_config(sys.argv[1:2], sys.argv[2:])))
