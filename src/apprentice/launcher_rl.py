"""`apprentice rl`: start the inference server, the orchestrator and the trainer; stop all if one fails.

    inference     [inference] backend (builtin: `apprentice serve`; vllm: `vllm serve` + weight reloader),
                  started on the newest complete OUTPUT/weights/step_{n} (the initial model on a fresh run).
                  Left out with [orchestrator.student_endpoint]: that server is used (and still told to reload).
    orchestrator  samples with the server, loads each step's weights into it, writes OUTPUT/rollouts/step_{n}
    trainer       trains on them (one process per rank; torchrun across nodes), publishes OUTPUT/weights/step_{n}

Rerunning the same command resumes: the trainer from its newest complete checkpoint (published weights newer
than that checkpoint are deleted first: those steps are trained again, and the server must not sample from
weights that are about to be replaced; it republishes the checkpoint's own weights when they are missing or
damaged), the orchestrator after its newest complete batch, and the server from the newest remaining weights
that verify (damaged ones are named and set aside).

Exit codes: 0 done; 3 stopped cleanly at the scoring teacher's spend cap (on-policy distillation: the trainer
trained every written step first; raise the cap and rerun); otherwise the failing process's code.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from apprentice.config import Config, write_resolved
from apprentice.config.resume import check_resumable
from apprentice.config.rl import check_rl_config
from apprentice.cpu_budget import split_cores, usable_cores, wait_policy
from apprentice.handoff.rollouts import latest_step_batch
from apprentice.handoff.stop import clear_stopped
from apprentice.handoff.weights import latest_verified, remove_after, weights_dir
from apprentice.inference.backends import backend_for
from apprentice.launcher import supervise, trainer_processes
from apprentice.orchestrator.spend import EXIT_SPEND_CAP
from apprentice.trainer import ckpt

ACCESS_LOG = re.compile(r'"(POST|GET) /v1/(chat/completions|models|weights) HTTP/1\.1" 200')
"""Per-request access-log lines of a healthy server (hundreds per step): left out of the run's log."""
FINAL_EVAL_GRACE_S = 1800.0
"""How long the orchestrator may keep scoring the final weights after the trainer is done."""


def resume_point(output_dir: Path) -> int:
    """The step the trainer will resume after (0 on a fresh run), with newer published weights removed."""
    latest = ckpt.latest_checkpoint(output_dir)
    step = int(latest.name.removeprefix("step_")) if latest is not None else 0
    removed = remove_after(output_dir, step)
    if removed:
        print(f"apprentice rl: removed published weights of steps {removed} (newer than checkpoint step {step}; "
              f"they are trained again)", flush=True)  # fmt: skip
    return step


def thread_budget(cfg: Config) -> tuple[int | None, int | None]:
    """(inference server threads, threads per trainer rank) from the usable cores (apprentice/cpu_budget.py);
    OMP_NUM_THREADS set in the environment is the trainer's choice as it stands (None: left alone)."""
    inference_threads = cfg.inference.threads if cfg.inference is not None else None
    overlap = cfg.orchestrator.max_async_level > 0  # sampling step n+1 while the trainer takes step n
    server, trainer = split_cores(usable_cores(), cfg.trainer.num_processes, inference_threads, cfg.trainer.threads,
                                  overlap=overlap)  # fmt: skip
    if cfg.trainer.threads is None and "OMP_NUM_THREADS" in os.environ:
        return server, None
    return server, trainer


@dataclass
class Processes:
    commands: dict[str, list[str]]
    """Name -> command line."""
    envs: dict[str, dict[str, str]]
    """Name -> the environment variables it gets on top of ours."""
    trainers: tuple[str, ...]
    """The trainer ranks' names (rank 0 is "trainer")."""
    server_threads: int | None
    trainer_threads: int | None
    """The CPU budget (`thread_budget`)."""


def processes(cfg: Config, config_path: Path, model: str | Path) -> Processes:
    """The run's processes: the inference server (its backend's variables), the orchestrator, each trainer rank
    (torchrun's variables), with the CPU budget's threads and OMP_WAIT_POLICY for server and trainers."""
    commands: dict[str, list[str]] = {}
    envs: dict[str, dict[str, str]] = {}
    server_threads, trainer_threads = thread_budget(cfg)
    if cfg.inference is not None:
        backend = backend_for(cfg)
        served = cfg.model_copy(deep=True)  # the server's command line only: the resolved config stays as written
        assert served.inference is not None
        served.inference.threads = server_threads
        commands["inference"] = backend.command(served, model)
        envs["inference"] = backend.env()
    commands["orchestrator"] = [sys.executable, "-m", "apprentice", "orchestrate", str(config_path)]
    trainers, trainer_envs = trainer_processes(cfg, config_path)
    commands.update(trainers)
    envs.update(trainer_envs)
    if trainer_threads is not None:
        for name in trainers:
            envs.setdefault(name, {})["OMP_NUM_THREADS"] = str(trainer_threads)
    for name in [*trainers, *(["inference"] if "inference" in commands else [])]:
        envs.setdefault(name, {}).update(wait_policy())
    return Processes(commands, envs, tuple(trainers), server_threads, trainer_threads)


def run_rl(cfg: Config) -> int:
    check_rl_config(cfg)
    output_dir = Path(cfg.output_dir)
    resumed = check_resumable(cfg)
    config_path = write_resolved(cfg)
    resume_point(output_dir)
    policy = latest_verified(output_dir, report=lambda problem: print(f"apprentice rl: {problem}", flush=True))
    model = weights_dir(output_dir, policy) if policy else cfg.model.name
    print(f"apprentice rl: {'resuming' if resumed else 'starting'} run in {output_dir} (config: {config_path}); "
          f"policy weights of step {policy} ({model})", flush=True)  # fmt: skip
    env = dict(os.environ)
    env.setdefault("TQDM_MININTERVAL", "5")
    plan = processes(cfg, config_path, model)
    print(f"apprentice rl: CPU threads: inference server {plan.server_threads}, trainer "
          f"{plan.trainer_threads or os.environ.get('OMP_NUM_THREADS', 'torch default')} per rank "
          f"({usable_cores()} usable cores)", flush=True)  # fmt: skip
    clear_stopped(output_dir)  # a previous attempt's stop must not end this attempt's trainer
    # An orchestrator stopped by the scoring teacher's spend cap (on-policy distillation) is a clean stop: the
    # trainer trains the steps already written, checkpoints, exports final/ and exits 0.
    code = supervise(plan.commands, env=env, envs=plan.envs, must_finish="trainer", services=("inference",),
                     grace_s=FINAL_EVAL_GRACE_S if cfg.orchestrator.eval_interval else 30.0, drop={"inference": ACCESS_LOG},
                     peers=plan.trainers, stop_code=EXIT_SPEND_CAP)  # fmt: skip
    if code == 0:
        print(f"apprentice rl: done; the trained policy is in {output_dir / 'final'}", flush=True)
    elif code == EXIT_SPEND_CAP:
        print(f"apprentice rl: stopped at the teacher spend cap after step {latest_step_batch(output_dir)} (exit code "
              f"{EXIT_SPEND_CAP}; see the orchestrator's message above); the policy trained so far, if any step "
              f"was, is in {output_dir / 'final'}. Raise orchestrator.teacher_model.max_tokens_total (or max_cost) "
              f"and rerun the same command to resume.", file=sys.stderr, flush=True)  # fmt: skip
    return code
