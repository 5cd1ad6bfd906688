"""`apprentice distill`: start the orchestrator and the trainer, stream their logs, stop all if one fails.

Both children read OUTPUT/config.toml (the fully resolved config written here), so what runs is exactly what
`--dry-run` printed. Rerunning the same command resumes: the orchestrator continues after the newest complete
batch, the trainer from its newest complete checkpoint.

Exit codes: 0 done; 3 stopped cleanly at the teacher spend cap (the trainer trained every written step first;
raise the cap and rerun to resume); otherwise the failing child's code (1 runtime, 2 config), 130 on Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from apprentice.config import Config, ConfigError, write_resolved
from apprentice.config.resume import check_resumable
from apprentice.orchestrator.spend import EXIT_SPEND_CAP

POLL_S = 0.2
GRACE_S = 10.0


def trainer_command(cfg: Config, config_path: Path) -> list[str]:
    if cfg.trainer.num_processes == 1:
        return [sys.executable, "-m", "apprentice", "train", str(config_path)]
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cfg.trainer.num_processes}",
        "-m", "apprentice", "train", str(config_path),
    ]  # fmt: skip


def _stream(name: str, pipe: IO[str], out: IO[str]) -> None:
    """Copy a child's output line by line with a prefix; progress bars (\\r updates) become lines too."""
    buffer = ""
    while chunk := pipe.read(1):
        if chunk in "\r\n":
            if buffer.strip():
                out.write(f"[{name}] {buffer}\n")
                out.flush()
            buffer = ""
        else:
            buffer += chunk
    if buffer.strip():
        out.write(f"[{name}] {buffer}\n")


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
    drained: Callable[[], bool] | None = None,
) -> int:  # fmt: skip
    """Run `commands` together; return 0 when `must_finish` exits 0, or the first failure's code.

    Any child exiting non-zero stops the others. Once `must_finish` is done, the others get a grace period
    and are stopped (an orchestrator has nothing left to do once the trainer has its last step).

    A child exiting with `stop_code` (the orchestrator at a spend cap) is a clean stop, not a failure: the others
    run until `drained()` holds (the trainer has trained every step written) or `must_finish` is done, are
    stopped, and `stop_code` is returned.
    """
    processes: dict[str, subprocess.Popen[str]] = {}
    threads = []
    for name, command in commands.items():
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1)
        processes[name] = proc
        assert proc.stdout is not None
        thread = threading.Thread(target=_stream, args=(name, proc.stdout, sys.stdout), daemon=True)
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
            if stopped_by is not None and (processes[must_finish].poll() == 0 or (drained is not None and drained())):
                _stop(processes)
                return stop_code or 0
            if processes[must_finish].poll() == 0:
                deadline = time.monotonic() + GRACE_S * 3
                while time.monotonic() < deadline and any(p.poll() is None for p in processes.values()):
                    time.sleep(POLL_S)
                _stop(processes)
                failed = {n: p.returncode for n, p in processes.items() if p.returncode not in (0, -signal.SIGTERM)}
                if failed:
                    print(f"apprentice: {', '.join(failed)} exited with {list(failed.values())} after the {must_finish} finished", file=sys.stderr)
                return 0
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        print("apprentice: interrupted; stopping all processes (rerun the same command to resume)", file=sys.stderr)
        _stop(processes)
        return 130
    finally:
        for thread in threads:
            thread.join(timeout=2.0)


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
    commands = {
        "orchestrator": [sys.executable, "-m", "apprentice", "orchestrate", str(config_path)],
        "trainer": trainer_command(cfg, config_path),
    }
    code = supervise(commands, env=env, must_finish="trainer", stop_code=EXIT_SPEND_CAP, drained=lambda: trainer_drained(output_dir))
    if code == 0:
        print(f"apprentice distill: done; the distilled student is in {output_dir / 'final'}", flush=True)
    elif code == EXIT_SPEND_CAP:
        from apprentice.transport import latest_step_batch

        print(
            f"apprentice distill: stopped at the teacher spend cap after step {latest_step_batch(output_dir)} (exit code "
            f"{EXIT_SPEND_CAP}; see the orchestrator's message above). Raise orchestrator.rollout_model.max_tokens_total "
            f"(or max_cost) and rerun the same command to resume.", file=sys.stderr, flush=True,
        )  # fmt: skip
    return code


def trainer_drained(output_dir: Path) -> bool:
    """The trainer has trained every step batch the orchestrator wrote."""
    from apprentice.transport import latest_step_batch, read_trainer_progress  # torch: keep the launcher light

    return read_trainer_progress(output_dir) >= latest_step_batch(output_dir)
