"""How `apprentice rl` shares this machine's cores between the inference server and the trainer ranks.

With `orchestrator.max_async_level` >= 1 both are torch processes running at the same time (the server samples
step n+1 while the trainer takes step n); each left to torch's default takes every core, and two pools of busy
threads on the same cores slow each other down far more than they gain. So unless told otherwise
(`inference.threads`, `trainer.threads`, or OMP_NUM_THREADS in the environment) the launcher then gives the
server half of the cores it may use (rounded down, at least one) and splits the rest evenly between this node's
trainer ranks (at least one each).

With `max_async_level = 0` they take turns (the server samples step n+1 only once the trainer has published
step n's weights, and the trainer waits for that batch), so each gets every core rather than half of them idle
half of the time. Overlapping still won on this 2-core machine (bench/rl_vs_trl.py, SmolLM2 capitals, 30 steps:
5.2 s per step with max_async_level 1 and one thread each, 6.6 s with 0 and two each). On GPU machines the
numbers only bound host-side work.

Idle threads sleep (`OMP_WAIT_POLICY=PASSIVE` in the server's and the trainers' environment, unless the user set
it): by default an OpenMP thread that finishes its share of an operation spins, waiting for the next one, and
on cores shared with another process (the server beside the trainer, the orchestrator, anything else on the
machine) spinning threads take the time slices their own pool's laggard needs. On this 2-core machine with other
jobs running (load ~5), one 2-thread SmolLM2 training step took 8-22 s with the default policy and 5-12 s with
PASSIVE (bench/rl_vs_trl.py's settings; 1 thread: 8-9.5 s).
"""

from __future__ import annotations

import os


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's or taskset's limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # platforms without sched_getaffinity (macOS)
        return os.cpu_count() or 1


def split_cores(
    cores: int, trainer_ranks: int, server: int | None = None, trainer: int | None = None, *, overlap: bool = True
) -> tuple[int, int]:
    """(server threads, threads per trainer rank) for `cores` cores; explicit choices are kept as given.
    `overlap`: server and trainer run at the same time (else they take turns and each may use every core)."""
    if not overlap:
        return server if server is not None else cores, trainer if trainer is not None else max(1, cores // max(1, trainer_ranks))
    server_threads = server if server is not None else max(1, cores // 2)
    left = max(1, cores - server_threads)
    return server_threads, trainer if trainer is not None else max(1, left // max(1, trainer_ranks))


def wait_policy() -> dict[str, str]:
    """Environment for a torch process that shares its cores: idle OpenMP threads sleep instead of spinning (see
    the module docstring); empty when the user chose a policy."""
    return {} if "OMP_WAIT_POLICY" in os.environ else {"OMP_WAIT_POLICY": "PASSIVE"}
