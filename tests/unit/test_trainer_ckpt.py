"""Checkpoints carry a sha256 manifest checked on resume; a damaged newest checkpoint falls back to the previous one.

Damage is made by the test (overwrite 4 KB inside a shard, truncate, garble, delete), on a small real model with
a real optimizer and DCP, in one process. The whole-trainer version (retraining the lost steps from the stored
step batches) is in tests/integration/test_trainer_run.py.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from apprentice import fsio
from apprentice.errors import ApprenticeError
from apprentice.handoff.paths import MANIFEST
from apprentice.trainer import ckpt
from apprentice.trainer.optim import NonFiniteError
from apprentice.trainer.train import StepResult, check_finite
from apprentice.trainer.world import World

WORLD = World()


class Parts:
    """A model, its optimizer and scheduler: the objects a checkpoint saves and restores."""

    def __init__(self, seed: int) -> None:
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 64))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.scheduler = LambdaLR(self.optimizer, lambda i: 1.0 / (1 + i))

    def train_step(self) -> None:
        loss = self.model(torch.randn(8, 64)).square().mean()
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def save(self, out: Path, step: int, keep: int = 3) -> Path:
        return ckpt.save_checkpoint(out, step, self.model, self.optimizer, self.scheduler, WORLD, keep)

    def resume(self, out: Path) -> int:
        return ckpt.resume(out, self.model, self.optimizer, self.scheduler, WORLD)


def shard(path: Path) -> Path:
    (found,) = sorted((path / "state").glob("*.distcp"))
    return found


def train_and_save(out: Path, steps: int, keep: int = 3) -> tuple[Parts, dict[int, dict[str, torch.Tensor]]]:
    parts = Parts(0)
    weights = {}
    for step in range(1, steps + 1):
        parts.train_step()
        parts.save(out, step, keep)
        weights[step] = parts.weights()
    return parts, weights


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_manifest_lists_every_file_and_modes_are_the_standard_ones(tmp_path: Path) -> None:
    _, _ = train_and_save(tmp_path, 1)
    path = tmp_path / "checkpoints" / "step_1"
    manifest = json.loads((path / MANIFEST).read_text())
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {MANIFEST, ckpt.MARKER}
    assert set(manifest["files"]) == on_disk and "trainer_state.json" in on_disk and any(n.endswith(".distcp") for n in on_disk)
    assert json.loads((path / ckpt.MARKER).read_text())["format"] == ckpt.FORMAT
    ckpt.verify_checkpoint(path)
    for p in [path, *path.rglob("*")]:
        want = (fsio.DIR_MODE if p.is_dir() else fsio.FILE_MODE) & ~fsio._umask()
        assert os.stat(p).st_mode & 0o777 == want, p


def overwrite_4k(path: Path) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 4096] = os.urandom(4096)
    path.write_bytes(bytes(data))


DAMAGE = {
    "overwrite_4k_in_shard": lambda p: (overwrite_4k(shard(p)), shard(p))[1],
    "truncated_shard": lambda p: (shard(p).write_bytes(shard(p).read_bytes()[:-100]), shard(p))[1],
    "garbled_trainer_state": lambda p: ((p / "trainer_state.json").write_text("{garbage"), p / "trainer_state.json")[1],
    "deleted_rng": lambda p: ((p / "rng_rank_0.safetensors").unlink(), p / "rng_rank_0.safetensors")[1],
    "garbled_manifest": lambda p: ((p / MANIFEST).write_text("\x00\x01"), p / MANIFEST)[1],
    "garbled_marker": lambda p: ((p / ckpt.MARKER).write_bytes(b"\xff\xfe"), p / ckpt.MARKER)[1],
    "marker_format_not_int": lambda p: ((p / ckpt.MARKER).write_text('{"step": 2, "format": "x"}'), p / ckpt.MARKER)[1],
    "deleted_manifest": lambda p: ((p / MANIFEST).unlink(), p / MANIFEST)[1],
    "manifest_entry_not_object": lambda p: ((p / MANIFEST).write_text('{"files": {"trainer_state.json": 3}}'), p / MANIFEST)[1],
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damage_is_named_then_the_previous_checkpoint_is_loaded(tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    _, weights = train_and_save(tmp_path, 2)
    step_2 = tmp_path / "checkpoints" / "step_2"
    bad_file = DAMAGE[damage](step_2)
    with pytest.raises(ckpt.CheckpointError, match=str(bad_file)):
        ckpt.verify_checkpoint(step_2)

    fresh = Parts(1)
    with caplog.at_level(logging.WARNING, logger="apprentice.trainer"):
        assert fresh.resume(tmp_path) == 1
    assert same(fresh.weights(), weights[1])
    assert str(bad_file) in caplog.text
    # Kept for inspection, no longer "complete": a later resume or pruning cannot mistake it for a good one.
    (aside,) = (tmp_path / "checkpoints").glob("step_2.corrupt-*")
    assert aside.is_dir() and not step_2.exists()
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [1]


def test_no_valid_checkpoint_is_a_clear_error_and_nothing_is_moved(tmp_path: Path) -> None:
    train_and_save(tmp_path, 2)
    for step in (1, 2):
        overwrite_4k(shard(tmp_path / "checkpoints" / f"step_{step}"))
    with pytest.raises(ckpt.CheckpointError, match=r"no checkpoint .* passes verification.*step_2.*step_1.*move the checkpoints directory aside") as info:
        Parts(1).resume(tmp_path)
    assert isinstance(info.value, ApprenticeError)
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [1, 2]  # a rerun must not silently start over


def test_pruning_after_a_fallback_keeps_the_verified_checkpoint(tmp_path: Path) -> None:
    # Checkpoints 1, 2, 3; step 3 is damaged; the resumed run re-saves step 2 with keep = 1.
    train_and_save(tmp_path, 3)
    overwrite_4k(shard(tmp_path / "checkpoints" / "step_3"))
    parts = Parts(1)
    assert parts.resume(tmp_path) == 2
    parts.train_step()
    parts.save(tmp_path, 3, keep=1)
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [3]
    ckpt.verify_checkpoint(tmp_path / "checkpoints" / "step_3")
    # Pruning counts only checkpoints older than the one just written.
    parts.train_step()
    parts.save(tmp_path, 2, keep=1)  # an out-of-order save must not delete the newer step 3
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [2, 3]


def test_a_checkpoint_without_manifest_from_an_older_version_still_loads(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _, weights = train_and_save(tmp_path, 1)
    path = tmp_path / "checkpoints" / "step_1"
    (path / MANIFEST).unlink()
    (path / ckpt.MARKER).write_text(json.dumps({"step": 1}))
    fresh = Parts(1)
    with caplog.at_level(logging.WARNING, logger="apprentice.trainer"):
        assert fresh.resume(tmp_path) == 1
    assert same(fresh.weights(), weights[1]) and "unverified" in caplog.text


def test_world_size_mismatch_is_a_checkpoint_error(tmp_path: Path) -> None:
    train_and_save(tmp_path, 1)
    parts = Parts(1)
    with pytest.raises(ckpt.CheckpointError, match=r"written by 1 trainer rank.*num_processes"):
        ckpt.load_checkpoint(tmp_path / "checkpoints" / "step_1", parts.model, parts.optimizer, parts.scheduler, World(0, 2, 0))


def test_a_background_checkpoint_holds_the_state_of_its_step_while_training_goes_on(tmp_path: Path) -> None:
    """The state is copied when save() returns; steps taken while the thread writes do not leak into it. Resuming
    it equals resuming a checkpoint written in the foreground at the same step, and training on from both agrees."""
    fore, back = tmp_path / "fore", tmp_path / "back"
    parts = Parts(0)
    parts.train_step()
    at_step_1 = parts.weights()
    parts.save(fore, 1)
    writer = ckpt.BackgroundCheckpointer()
    writer.save(back, 1, parts.model, parts.optimizer, parts.scheduler, WORLD, 3)
    for _ in range(3):  # the live model moves on while the thread writes
        parts.train_step()
    writer.wait()
    ckpt.verify_checkpoint(back / "checkpoints" / "step_1")
    files = {p.relative_to(back / "checkpoints" / "step_1").as_posix() for p in (back / "checkpoints" / "step_1").rglob("*")}
    assert files == {p.relative_to(fore / "checkpoints" / "step_1").as_posix() for p in (fore / "checkpoints" / "step_1").rglob("*")}
    resumed = {}
    for name, out in (("fore", fore), ("back", back)):
        other = Parts(1)
        assert other.resume(out) == 1
        assert same(other.weights(), at_step_1)
        other.train_step()
        resumed[name] = other.weights()
    assert same(resumed["fore"], resumed["back"])  # optimizer moments and schedule restored alike


def test_a_failed_background_write_is_raised_by_the_next_save_or_wait(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parts = Parts(0)
    parts.train_step()
    writer = ckpt.BackgroundCheckpointer()

    def disk_full(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "_seal", disk_full)
    writer.save(tmp_path, 1, parts.model, parts.optimizer, parts.scheduler, WORLD, 3)
    with pytest.raises(OSError, match="No space left"):
        writer.wait()
    assert ckpt.latest_checkpoint(tmp_path) is None  # nothing half-written looks complete
    writer.wait()  # the error was reported once


def test_settle_finishes_the_write_in_flight_and_logs_its_error_instead_of_raising(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """On the way out of a failed run the checkpoint being written completes (a rerun resumes from it), and a
    failure of that write does not replace the error that stopped the run."""
    parts = Parts(0)
    parts.train_step()
    writer = ckpt.BackgroundCheckpointer()
    seal = ckpt._seal
    monkeypatch.setattr(ckpt, "_seal", lambda *a, **k: (time.sleep(0.5), seal(*a, **k)))
    writer.save(tmp_path / "slow", 1, parts.model, parts.optimizer, parts.scheduler, WORLD, 3)
    writer.settle()
    assert ckpt.latest_checkpoint(tmp_path / "slow") == tmp_path / "slow" / "checkpoints" / "step_1"

    def disk_full(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "_seal", disk_full)
    writer.save(tmp_path / "full", 1, parts.model, parts.optimizer, parts.scheduler, WORLD, 3)
    with caplog.at_level("ERROR", logger="apprentice.trainer"):
        writer.settle()
    assert "failed too: [Errno 28] No space left on device" in caplog.text


def test_a_non_finite_step_is_reported_even_when_the_checkpoint_being_written_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A NaN step while step 1's checkpoint is still being written: the NaN is the error raised (with what to do),
    the failed write is logged beside it, and step 1 is not named as a good checkpoint."""
    parts = Parts(0)
    parts.train_step()
    writer = ckpt.BackgroundCheckpointer()

    def slow_disk_full(*args: object) -> None:
        time.sleep(0.3)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "_seal", slow_disk_full)
    writer.save(tmp_path, 1, parts.model, parts.optimizer, parts.scheduler, WORLD, 3)
    nan = StepResult(metrics={"loss/total": float("nan")}, grad_norm=1.0, tokens=8, pad_tokens=0)
    with caplog.at_level("ERROR", logger="apprentice.trainer"), pytest.raises(NonFiniteError) as raised:
        check_finite(2, nan, tmp_path, [], writer)
    assert "step 2: non-finite loss (nan)" in str(raised.value)
    assert "Last good checkpoint: none yet" in str(raised.value)
    assert "failed too: [Errno 28] No space left on device" in caplog.text


def test_a_resume_keeps_the_optimizer_state_but_takes_the_hyperparameters_of_its_config(tmp_path: Path) -> None:
    """An edited trainer.optim (weight decay, betas, eps) was overwritten by the checkpoint's on resume while
    OUTPUT/config.toml showed the new values; the moments and step counts still come from the checkpoint."""
    parts = Parts(0)
    parts.train_step()
    parts.save(tmp_path, 1)
    saved_moments = {k: v.clone() for k, v in parts.optimizer.state[next(iter(parts.model.parameters()))].items()}
    edited = Parts(1)
    for group in edited.optimizer.param_groups:
        group.update(betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    assert edited.resume(tmp_path) == 1
    group = edited.optimizer.param_groups[0]
    assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.8, 0.95), 1e-6, 0.1)
    state = edited.optimizer.state[next(iter(edited.model.parameters()))]
    assert all(torch.equal(state[k], v) for k, v in saved_moments.items())


def test_every_rank_names_the_rank_file_that_holds_the_nan(tmp_path: Path) -> None:
    """Two ranks, the NaN advantage in rank 1's file: rank 0 (whose own samples are finite) told the user the model
    diverged and to lower the learning rate, while rank 1 said to delete the batch; which line the user saw was a
    race. Both now name rank_1's file and say to delete the batch."""
    from apprentice.handoff.rollouts import write_step_batch
    from apprentice.types import TrainingSample

    good = TrainingSample([1, 2, 3], [False, True, True], [0.0, -1.0, -1.0], 0.5)
    bad = TrainingSample([1, 2, 3], [False, True, True], [0.0, -1.0, -1.0], float("nan"))
    write_step_batch(tmp_path, 2, [[good], [bad]])
    nan = StepResult(metrics={"loss/total": float("nan")}, grad_norm=float("nan"), tokens=6, pad_tokens=0)
    for own in ([good], [bad]):  # rank 0's view, then rank 1's
        with pytest.raises(NonFiniteError) as raised:
            check_finite(2, nan, tmp_path, own, None, world_size=2)
        assert "holds non-finite values (rank_1.safetensors: sample 0 has advantage nan)" in str(raised.value)
        assert "lower trainer.optim.lr" not in str(raised.value)
