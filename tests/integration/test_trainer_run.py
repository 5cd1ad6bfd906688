"""The whole trainer on the tiny student: metrics, checkpoints, export, NaN stop, kill -9 resume, 2 ranks, 2 nodes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from apprentice.config import Config, dump_config
from apprentice.handoff.progress import read_trainer_progress
from apprentice.handoff.rollouts import BatchError, rank_file, split_across_ranks, write_step_batch
from apprentice.inference.launch import free_port
from apprentice.launcher import trainer_command
from apprentice.metrics import read_metrics as read_metrics_file
from apprentice.testing.tiny import save_tiny_student
from apprentice.trainer import ckpt
from apprentice.trainer.ckpt import complete_checkpoints
from apprentice.trainer.metrics import metrics_path
from apprentice.trainer.optim import NonFiniteError
from apprentice.trainer.train import main
from apprentice.types import TrainingSample

REPO = Path(__file__).resolve().parents[2]


def read_metrics(output_dir: Path) -> list[dict[str, Any]]:
    return read_metrics_file(metrics_path(output_dir))


@pytest.fixture(scope="module")
def student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_student(tmp_path_factory.mktemp("student"))


def step_samples(step: int, n: int = 6) -> list[TrainingSample]:
    rng = random.Random(step)
    out = []
    for _ in range(n):
        t = rng.randint(6, 40)
        prompt = rng.randint(2, t - 2)
        ids = [rng.randrange(3, 60) for _ in range(t)]  # a small alphabet: learnable in a few steps
        out.append(TrainingSample(ids, [i >= prompt for i in range(t)], [0.0] * t, 1.0))
    return out


def write_batches(output: Path, steps: int, world_size: int = 1) -> None:
    for step in range(1, steps + 1):
        write_step_batch(output, step, split_across_ranks(step_samples(step), world_size))


def make_config(student: Path, output: Path, **trainer: Any) -> Config:
    base = {"max_steps": 4, "micro_batch_tokens": 64, "loss": {"type": "sft"}, "optim": {"lr": 3e-3},
            "ckpt": {"interval": 1, "keep": 2}, "batch_timeout_s": 30.0}
    return Config.model_validate({
        "model": {"name": str(student)}, "output_dir": str(output), "inference": {},
        "trainer": {**base, **trainer}, "log": {"progress": False},
    })


def final_weights(output: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output / "final" / "model.safetensors"))


def run_cli(args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)


def test_end_to_end_metrics_checkpoints_export(student: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    write_batches(out, 4)
    main(make_config(student, out))

    lines = read_metrics(out)
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    for key in ("loss/nll", "loss/ppl", "loss/tokens", "lr", "grad_norm", "perf/tokens_per_s", "perf/padding_fraction"):
        assert all(key in m for m in lines), key
    assert lines[0]["perf/padding_fraction"] == 0.0
    assert read_trainer_progress(out) == 4
    assert [s for s, _ in complete_checkpoints(out)] == [3, 4]  # keep = 2

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    assert tokenizer.chat_template and (out / "final" / "generation_config.json").is_file()
    initial = AutoModelForCausalLM.from_pretrained(student)
    changed = [not torch.equal(a, b) for a, b in zip(model.parameters(), initial.parameters(), strict=True)]
    assert all(changed)
    # Learning happened: the loss of step 1's data is lower under the final weights.
    ids = torch.tensor([step_samples(1)[0].token_ids])
    with torch.no_grad():
        assert model(ids, labels=ids).loss < initial(ids, labels=ids).loss


def test_resume_matches_uninterrupted_in_process(student: Path, tmp_path: Path) -> None:
    ref, two_part = tmp_path / "ref", tmp_path / "two_part"
    for out in (ref, two_part):
        write_batches(out, 4)
    main(make_config(student, ref, optim={"lr": 3e-3, "warmup_steps": 2, "schedule": "cosine"}))
    main(make_config(student, two_part, max_steps=2, optim={"lr": 3e-3, "warmup_steps": 2, "schedule": "cosine"}))
    # Same schedule horizon is needed for identical lrs: resume the 2-step run as a 4-step run.
    main(make_config(student, two_part, optim={"lr": 3e-3, "warmup_steps": 2, "schedule": "cosine"}))
    a, b = final_weights(ref), final_weights(two_part)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [m["step"] for m in read_metrics(two_part)] == [1, 2, 3, 4]


def test_nan_stops_with_clear_error_and_keeps_last_checkpoint(
    student: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A slow disk: step 1's checkpoint is still being written (background thread) when step 2 fails. The message
    # must name it anyway, once it is complete (CI once caught the race and read "none yet").
    seal = ckpt._seal
    monkeypatch.setattr(ckpt, "_seal", lambda *a, **k: (time.sleep(1.0), seal(*a, **k)))
    out = tmp_path / "run"
    write_step_batch(out, 1, [step_samples(1)])
    bad = step_samples(2)
    bad[0].advantage = float("nan")  # poisons the rl loss of step 2
    write_step_batch(out, 2, [bad])
    # A wide trust region keeps the (meaningless, logprob-free) tokens in the loss so the NaN reaches it.
    cfg = make_config(student, out, max_steps=2, loss={"type": "rl", "ratio_low": 1e-6, "ratio_high": 1e6})
    with pytest.raises(NonFiniteError, match=r"step 2: non-finite.*checkpoints/step_1") as err:
        main(cfg)
    batch = str(out / "rollouts" / "step_2")
    # The message names the batch that holds the NaN and says to delete it (not to lower the learning rate).
    assert f"step batch {batch} holds non-finite values (sample 0 has advantage nan)" in str(err.value)
    assert f"Delete {batch} and every later rollouts/step_*" in str(err.value) and "optim.lr" not in str(err.value)
    assert [s for s, _ in complete_checkpoints(out)] == [1]
    assert read_trainer_progress(out) == 1


def test_corrupt_batch_is_named(student: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    write_batches(out, 1)
    path = rank_file(out, 1, 0)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(BatchError, match=str(path)):
        main(make_config(student, out, max_steps=1))


def test_kill_9_resume_gives_identical_weights(student: Path, tmp_path: Path) -> None:
    steps = 10
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    for out in (ref, killed):
        write_batches(out, steps)
    cfg_path = tmp_path / "killed.toml"
    cfg_path.write_text(dump_config(make_config(student, killed, max_steps=steps)))
    cmd = [sys.executable, "-m", "apprentice.trainer.train", str(cfg_path)]

    proc = run_cli(cmd)
    deadline = time.monotonic() + 120
    while read_trainer_progress(killed) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, proc.communicate()[0].decode()[-3000:]
    proc.send_signal(signal.SIGKILL)  # at whatever point of step 4 (forward, backward, checkpoint save) it is in
    proc.wait()
    assert read_trainer_progress(killed) < steps

    rerun = run_cli(cmd)
    log = rerun.communicate(timeout=180)[0].decode()
    assert rerun.returncode == 0, log[-3000:]
    ref_cfg_path = tmp_path / "ref.toml"
    ref_cfg_path.write_text(dump_config(make_config(student, ref, max_steps=steps)))
    reference = run_cli([sys.executable, "-m", "apprentice.trainer.train", str(ref_cfg_path)])
    assert reference.communicate(timeout=180)[0] is not None and reference.returncode == 0

    a, b = final_weights(ref), final_weights(killed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    assert [m["step"] for m in read_metrics(killed)] == list(range(1, steps + 1))


def test_two_ranks_match_one_rank(student: Path, tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    write_batches(one, 3, world_size=1)
    write_batches(two, 3, world_size=2)
    # Step 4 has a single sample: rank 1 gets nothing and must still join forward/backward (placeholder row).
    write_step_batch(one, 4, [step_samples(4, n=1)])
    write_step_batch(two, 4, split_across_ranks(step_samples(4, n=1), 2))
    main(make_config(student, one))
    cfg_path = tmp_path / "two.toml"
    cfg_path.write_text(dump_config(make_config(student, two, num_processes=2)))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "apprentice.trainer.train", str(cfg_path)]
    proc = run_cli(torchrun)
    log = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, log[-4000:]

    m1, m2 = read_metrics(one), read_metrics(two)
    assert [m["step"] for m in m2] == [1, 2, 3, 4]
    assert m2[3]["perf/padding_fraction"] > 0.0 == m1[3]["perf/padding_fraction"]
    for a, b in zip(m1, m2, strict=True):
        assert b["loss/tokens"] == a["loss/tokens"]
        assert b["loss/nll"] == pytest.approx(a["loss/nll"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    w1, w2 = final_weights(one), final_weights(two)
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5, msg=k)
    exported = AutoModelForCausalLM.from_pretrained(two / "final")  # tied lm_head restored from the embeddings
    assert torch.equal(exported.get_output_embeddings().weight, exported.get_input_embeddings().weight)


def test_a_user_error_on_two_nodes_ends_each_agent_with_its_line_and_code(tmp_path: Path) -> None:
    """The launcher's multi-node command, twice on one machine (two "nodes" on loopback), with a student that does
    not exist: every agent ends with the rank's one line and exit code 2, not torchrun's ChildFailedError
    traceback and exit code 1."""
    missing = tmp_path / "no-such-student"
    cfg = make_config(missing, tmp_path / "nodes", num_nodes=2, num_processes=1, rdzv_endpoint=f"127.0.0.1:{free_port()}")
    cfg_path = tmp_path / "nodes.toml"
    cfg_path.write_text(dump_config(cfg))
    agents = [run_cli(trainer_command(cfg, cfg_path)) for _ in range(2)]
    logs = [agent.communicate(timeout=300)[0].decode() for agent in agents]
    lost = 0
    for agent, log in zip(agents, logs, strict=True):
        assert "Traceback" not in log and "ChildFailedError" not in log and "Root Cause" not in log, log[-4000:]
        if agent.returncode == 1 and "lost the trainer's rendezvous" in log:
            # The other agent hosted the rendezvous and ended first (its rank failed sooner): one line, no traceback.
            lost += 1
            continue
        assert agent.returncode == 2, log[-4000:]
        errors = [line for line in log.splitlines() if "error:" in line]
        assert len(errors) == 1 and "model.name" in errors[0] and str(missing) in errors[0], log[-4000:]
    assert lost <= 1  # at least one agent reports its rank's own error


def test_two_nodes_match_one_process(student: Path, tmp_path: Path) -> None:
    """Two torchrun agents of one process each (the launcher's multi-node command) form one 2-rank world."""
    one, nodes = tmp_path / "one", tmp_path / "nodes"
    write_batches(one, 3, world_size=1)
    main(make_config(student, one, max_steps=3))
    cfg = make_config(student, nodes, max_steps=3, num_nodes=2, num_processes=1, rdzv_endpoint=f"127.0.0.1:{free_port()}")
    assert cfg.trainer.world_size == 2
    write_batches(nodes, 3, world_size=cfg.trainer.world_size)  # what the orchestrator does for this config
    cfg_path = tmp_path / "nodes.toml"
    cfg_path.write_text(dump_config(cfg))
    command = trainer_command(cfg, cfg_path)
    assert "--nnodes=2" in command and "--rdzv-backend=c10d" in command
    agents = [run_cli(command) for _ in range(2)]  # the same command on every "node"
    logs = [agent.communicate(timeout=300)[0].decode() for agent in agents]
    for agent, log in zip(agents, logs, strict=True):
        assert agent.returncode == 0, log[-4000:]

    m1, m2 = read_metrics(one), read_metrics(nodes)
    assert [m["step"] for m in m2] == [1, 2, 3]
    for a, b in zip(m1, m2, strict=True):
        assert b["loss/tokens"] == a["loss/tokens"]
        assert b["loss/nll"] == pytest.approx(a["loss/nll"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    w1, w2 = final_weights(one), final_weights(nodes)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5, msg=k)
