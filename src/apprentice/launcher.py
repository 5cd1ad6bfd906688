"""`apprentice distill`: start the orchestrator and the trainer, stream their logs, stop all if one fails.

Both children read OUTPUT/config.toml (the fully resolved config written here), so what runs is exactly what
`--dry-run` printed. Rerunning the same command resumes: the orchestrator continues after the newest complete
batch, the trainer from its newest complete checkpoint.

Exit codes: 0 done; 3 stopped cleanly at the teacher spend cap (the trainer trained every written step first;
raise the cap and rerun to resume); otherwise the failing child's code (1 runtime, 2 config), 130 on Ctrl-C.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from apprentice.config import Config, ConfigError, write_resolved
from apprentice.config.resume import check_resumable
from apprentice.handoff.stop import clear_stopped
from apprentice.orchestrator.spend import EXIT_SPEND_CAP

POLL_S = 0.2
GRACE_S = 10.0
USER_ERROR = re.compile(r"^apprentice( \w+)?: error: ")
"""The one line `cli.main` / `errors.exit_on_user_error` print for an ApprenticeError."""


def trainer_processes(cfg: Config, config_path: Path) -> tuple[dict[str, list[str]], dict[str, dict[str, str]]]:
    """(commands, per-process env vars) of this node's trainer, for `supervise`; rank 0 is named "trainer".

    On one node with several ranks the launcher starts the ranks itself (the env:// variables torchrun would set,
    rendezvous on a free loopback port), so each rank is a child it supervises: a rank's user error ends the run
    with that rank's one-line message and exit code, not torchrun's ChildFailedError traceback. One process, or
    several nodes (which need torchrun's rendezvous), run `trainer_command` as the single "trainer".
    """
    t = cfg.trainer
    if t.world_size == 1 or t.num_nodes > 1:
        return {"trainer": trainer_command(cfg, config_path)}, {}
    from apprentice.inference.launch import free_port

    port = str(free_port())
    command = [sys.executable, "-m", "apprentice", "train", str(config_path)]
    names = ["trainer", *(f"trainer.{rank}" for rank in range(1, t.num_processes))]
    n = str(t.num_processes)
    envs = {
        name: {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": n, "LOCAL_WORLD_SIZE": n, "GROUP_RANK": "0",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        for rank, name in enumerate(names)
    }  # fmt: skip
    if "OMP_NUM_THREADS" not in os.environ:  # as torchrun does: n ranks of all-core thread pools would thrash
        for env in envs.values():
            env["OMP_NUM_THREADS"] = "1"
    return dict.fromkeys(names, command), envs


def trainer_command(cfg: Config, config_path: Path) -> list[str]:
    """This node's trainer: plain python for one process, torchrun for several, c10d rendezvous across nodes.

    With trainer.num_nodes > 1 every node runs this same command (docs/multinode.md); the agents meet at
    trainer.rdzv_endpoint and the rendezvous assigns node ranks, so no node needs to know its own (torchrun's
    default rendezvous id is the same everywhere; one endpoint HOST:PORT serves one run at a time).
    """
    t = cfg.trainer
    if t.world_size == 1:
        return [sys.executable, "-m", "apprentice", "train", str(config_path)]
    if t.num_nodes == 1:
        where = ["--standalone"]
    else:
        where = [f"--nnodes={t.num_nodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={t.rdzv_endpoint}"]
    # apprentice.torchrun is torchrun itself, ending with a failed rank's exit code instead of its own traceback.
    return [
        sys.executable, "-m", "apprentice.torchrun", *where, f"--nproc-per-node={t.num_processes}",
        "-m", "apprentice", "train", str(config_path),
    ]  # fmt: skip


def _stream(name: str, pipe: IO[str], out: IO[str], drop: re.Pattern[str] | None = None,
            keep: Callable[[str, str], bool] | None = None) -> None:  # fmt: skip
    """Copy a child's output line by line with a prefix; progress bars (\\r updates) become lines too.
    Lines matching `drop` (e.g. a server's per-request access log) or refused by `keep(name, line)` are left out."""
    buffer = ""
    while chunk := pipe.read(1):
        if chunk in "\r\n":
            if buffer.strip() and not (drop and drop.search(buffer)) and (keep is None or keep(name, buffer)):
                out.write(f"[{name}] {buffer}\n")
                out.flush()
            buffer = ""
        else:
            buffer += chunk
    if buffer.strip() and (keep is None or keep(name, buffer)):
        out.write(f"[{name}] {buffer}\n")


class _PeerFilter:
    """Keeps the output of a group of peer processes (trainer ranks) to the first failure's.

    When one rank stops (a user error, a crash), the others fail inside their next collective with a traceback
    of their own that only says a peer went away. So once a peer has printed a user-error line or exited
    non-zero, the other peers' further lines are left out: the run ends with the first rank's message (or, for an
    unexpected error, its traceback) alone.
    """

    def __init__(self, peers: tuple[str, ...], processes: dict[str, subprocess.Popen[str]]) -> None:
        self.peers, self.processes = peers, processes
        self.first_error: str | None = None
        self.lock = threading.Lock()

    def __call__(self, name: str, line: str) -> bool:
        if name not in self.peers:
            return True
        with self.lock:
            if self.first_error is None and USER_ERROR.search(line):
                self.first_error = name
                return True
            if self.first_error is not None:
                return self.first_error == name
            others = (self.processes.get(peer) for peer in self.peers if peer != name)
            return not any(proc is not None and proc.poll() not in (None, 0) for proc in others)


def _stop(processes: dict[str, subprocess.Popen[str]]) -> None:
    for proc in processes.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    for proc in processes.values():
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def supervise(
    commands: dict[str, list[str]], *, env: dict[str, str], must_finish: str, stop_code: int | None = None,
    services: tuple[str, ...] = (), grace_s: float = GRACE_S * 3,
    envs: dict[str, dict[str, str]] | None = None, drop: dict[str, re.Pattern[str]] | None = None,
    peers: tuple[str, ...] = (),
) -> int:  # fmt: skip
    """Run `commands` together; return 0 when `must_finish` exits 0, or the first failure's code.

    Any child exiting non-zero stops the others. Once `must_finish` is done, the others that are not
    `services` (servers that never exit on their own) get `grace_s` to finish (an orchestrator has nothing
    left to do once the trainer has its last step, bar a final evaluation), then everything is stopped.

    A child exiting with `stop_code` (the orchestrator at a spend cap) is a clean stop, not a failure: the others
    run until `must_finish` exits 0 (the trainer, told where the orchestrator stopped, trains the steps written,
    checkpoints and exports), are stopped, and `stop_code` is returned.

    `envs` adds per-child environment variables; `drop` filters a child's log lines. `peers` are the ranks of one
    job: after the first of them fails, the others' lines are left out (`_PeerFilter`).
    """
    processes: dict[str, subprocess.Popen[str]] = {}
    keep = _PeerFilter(peers, processes)
    threads = []
    previous = _on_sigterm_interrupt()
    for name, command in commands.items():
        child_env = {**env, **(envs or {}).get(name, {})}
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env, bufsize=1)
        processes[name] = proc
        assert proc.stdout is not None
        thread = threading.Thread(target=_stream, args=(name, proc.stdout, sys.stdout, (drop or {}).get(name), keep), daemon=True)
        thread.start()
        threads.append(thread)
    stopped_by: str | None = None
    try:
        while True:
            for name, proc in processes.items():
                code = proc.poll()
                if name == stopped_by:
                    continue
                if code is not None and code == stop_code and name != must_finish and stopped_by is None:
                    stopped_by = name
                    print(f"apprentice: the {name} stopped cleanly (exit code {code}); letting the {must_finish} finish the steps already written", file=sys.stderr)
                    continue
                if code not in (None, 0):
                    others = [n for n in processes if n != name and processes[n].poll() is None]
                    print(f"apprentice: the {name} failed (exit code {code}); stopping {', '.join(others) or 'nothing else'}. See its log above.", file=sys.stderr)
                    _stop(processes)
                    return code or 1
            if stopped_by is not None and processes[must_finish].poll() == 0:
                _stop(processes)
                return stop_code or 0
            if processes[must_finish].poll() == 0:
                deadline = time.monotonic() + grace_s
                waiting = [p for n, p in processes.items() if n not in services]
                while time.monotonic() < deadline and any(p.poll() is None for p in waiting):
                    time.sleep(POLL_S)
                _stop(processes)
                failed = {n: p.returncode for n, p in processes.items() if p.returncode not in (0, -signal.SIGTERM) and n not in services}
                if failed:
                    print(f"apprentice: {', '.join(failed)} exited with {list(failed.values())} after the {must_finish} finished", file=sys.stderr)
                return 0
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        print("apprentice: interrupted; stopping all processes (rerun the same command to resume)", file=sys.stderr)
        _stop(processes)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        for thread in threads:
            thread.join(timeout=2.0)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _on_sigterm_interrupt() -> Any:
    """Make SIGTERM (a scheduler or `kill` stopping the launcher) stop the children like Ctrl-C does, instead of
    leaving them running; returns the previous handler (None off the main thread, where signals cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _interrupt)


def check_teacher_key(cfg: Config) -> None:
    """Fail before starting anything when the teacher's key variable is unset: every request would be refused."""
    teacher = cfg.orchestrator.rollout_model
    if teacher is not None and teacher.api_key_var and not os.environ.get(teacher.api_key_var):
        raise ConfigError(
            f"orchestrator.rollout_model.api_key_var names {teacher.api_key_var}, which is not set in the environment: "
            f"export {teacher.api_key_var}=... (or remove api_key_var for an endpoint without authentication)"
        )


def run_distill(cfg: Config) -> int:
    check_teacher_key(cfg)
    output_dir = Path(cfg.output_dir)
    resumed = check_resumable(cfg)
    config_path = write_resolved(cfg)
    print(f"apprentice distill: {'resuming' if resumed else 'starting'} run in {output_dir} (config: {config_path})", flush=True)
    env = dict(os.environ)
    env.setdefault("TQDM_MININTERVAL", "5")  # children's bars become log lines; keep them few
    trainers, envs = trainer_processes(cfg, config_path)
    commands = {"orchestrator": [sys.executable, "-m", "apprentice", "orchestrate", str(config_path)], **trainers}
    clear_stopped(output_dir)  # a previous attempt's stop must not end this attempt's trainer
    # At a spend cap the orchestrator exits 3 and says where it stopped (OUTPUT/orchestrator/stopped.json): the
    # trainer trains the written steps, checkpoints, exports final/ and exits 0.
    code = supervise(commands, env=env, envs=envs, must_finish="trainer", stop_code=EXIT_SPEND_CAP,
                     peers=tuple(trainers))  # fmt: skip
    if code == 0:
        print(f"apprentice distill: done; the distilled student is in {output_dir / 'final'}", flush=True)
    elif code == EXIT_SPEND_CAP:
        from apprentice.handoff.rollouts import latest_step_batch

        print(
            f"apprentice distill: stopped at the teacher spend cap after step {latest_step_batch(output_dir)} (exit code "
            f"{EXIT_SPEND_CAP}; see the orchestrator's message above); the model trained so far is in "
            f"{output_dir / 'final'}. Raise orchestrator.rollout_model.max_tokens_total (or max_cost) and rerun the "
            f"same command to resume.", file=sys.stderr, flush=True,
        )  # fmt: skip
    return code

