"""The orchestrator -> trainer hand-off: atomic step directories, validation, waiting, rank balance, progress."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from apprentice import fsio
from apprentice.errors import ApprenticeError
from apprentice.handoff.progress import ProgressError, read_trainer_progress, write_trainer_progress
from apprentice.handoff.rollouts import (
    BatchError,
    BatchTimeoutError,
    drop_unpackable,
    latest_step_batch,
    rank_file,
    read_step_batch,
    remove_partial_steps,
    split_across_ranks,
    step_dir,
    wait_for_step_batch,
    write_step_batch,
)
from apprentice.types import TrainingSample


def make_samples(n: int, seed: int = 0) -> list[TrainingSample]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        t = rng.randint(1, 30)
        out.append(
            TrainingSample(
                [rng.randrange(50000) for _ in range(t)],
                [rng.random() < 0.5 for _ in range(t)],
                [-rng.random() * 5 for _ in range(t)],
                rng.uniform(-2, 2),
            )
        )
    return out


def assert_same(a: list[TrainingSample], b: list[TrainingSample]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.token_ids == y.token_ids
        assert x.loss_mask == y.loss_mask
        assert x.advantage == y.advantage  # float64 on disk: exact
        assert x.logprobs == pytest.approx(y.logprobs, abs=1e-6)  # float32 on disk


def test_round_trip_every_rank_including_empty(tmp_path: Path) -> None:
    per_rank = [make_samples(5, 1), [], make_samples(3, 2)]
    path = write_step_batch(tmp_path, 1, per_rank, meta={"source": "test"})
    assert path == step_dir(tmp_path, 1)
    for rank, expected in enumerate(per_rank):
        assert_same(read_step_batch(tmp_path, 1, rank), expected)
    assert not [p for p in (tmp_path / "rollouts").iterdir() if p.name.startswith(".")]  # no temp dir left


def test_step_written_once_and_latest(tmp_path: Path) -> None:
    assert latest_step_batch(tmp_path) == 0
    write_step_batch(tmp_path, 1, [make_samples(2)])
    write_step_batch(tmp_path, 3, [make_samples(2)])
    (tmp_path / "rollouts" / "step_7").mkdir()  # incomplete (no marker): ignored, and replaceable
    assert latest_step_batch(tmp_path) == 3
    with pytest.raises(FileExistsError):
        write_step_batch(tmp_path, 3, [make_samples(2)])
    write_step_batch(tmp_path, 7, [make_samples(1)])
    assert latest_step_batch(tmp_path) == 7


def test_partial_steps_of_a_killed_writer_are_removed(tmp_path: Path) -> None:
    write_step_batch(tmp_path, 1, [make_samples(2)])
    # A writer killed inside atomic_dir (no exception handler runs) leaves its temporary directory behind.
    killed = ("import os, sys; from pathlib import Path; from apprentice import fsio\n"
              "with fsio.atomic_dir(Path(sys.argv[1]) / 'rollouts' / 'step_2') as tmp:\n"
              "    (tmp / 'rank_0.safetensors').write_bytes(b'half'); os._exit(9)")  # fmt: skip
    assert subprocess.run([sys.executable, "-c", killed, str(tmp_path)]).returncode == 9
    leftovers = list((tmp_path / "rollouts").glob(".step_2.tmp-*"))
    assert len(leftovers) == 1
    assert remove_partial_steps(tmp_path) == leftovers
    assert sorted(p.name for p in (tmp_path / "rollouts").iterdir()) == ["step_1"]  # complete steps are kept
    assert latest_step_batch(tmp_path) == 1
    assert remove_partial_steps(tmp_path / "fresh") == []  # no rollouts/ yet


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_corrupt_file_is_a_batch_error_naming_the_file(tmp_path: Path, damage: str) -> None:
    write_step_batch(tmp_path, 2, [make_samples(4)])
    path = rank_file(tmp_path, 2, 0)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 17]
    elif damage == "flip":
        data[-5] ^= 0xFF  # inside the payload: only the checksum can notice
    else:
        data = bytearray(b"not a batch at all")
    path.write_bytes(bytes(data))
    with pytest.raises(BatchError, match=str(path)) as info:
        read_step_batch(tmp_path, 2, 0)
    # The fix must work with the orchestrator's resume rule (it continues after the newest complete step).
    assert isinstance(info.value, ApprenticeError) and "every later rollouts/step_* directory" in str(info.value)


@pytest.mark.parametrize("content", [b"", b"{not json", b"\xff\xfe", b"[1, 2]", b'{"world_size": "2"}'])
def test_corrupt_marker_is_a_batch_error_naming_it(tmp_path: Path, content: bytes) -> None:
    write_step_batch(tmp_path, 1, [make_samples(2)])
    marker = step_dir(tmp_path, 1) / "COMPLETE"
    marker.write_bytes(content)
    with pytest.raises(BatchError, match=str(marker)):
        read_step_batch(tmp_path, 1, 0)


def test_written_files_have_the_standard_modes(tmp_path: Path) -> None:
    write_step_batch(tmp_path, 1, [make_samples(2), make_samples(1)])
    write_trainer_progress(tmp_path, 1)
    for p in [step_dir(tmp_path, 1), *step_dir(tmp_path, 1).iterdir(), tmp_path / "trainer" / "progress.json"]:
        want = (fsio.DIR_MODE if p.is_dir() else fsio.FILE_MODE) & ~fsio._umask()
        assert os.stat(p).st_mode & 0o777 == want, p


def test_unpackable_samples_are_dropped_and_counted() -> None:
    samples = make_samples(20, seed=5) + [TrainingSample([], [], [], 0.0)]
    kept, dropped = drop_unpackable(samples, 16)
    assert [s for s in samples if 0 < len(s) <= 16] == kept
    assert dropped == len(samples) - len(kept) and dropped > 1
    assert drop_unpackable(kept, 16) == (kept, 0)


def test_wrong_rank_and_incomplete_step(tmp_path: Path) -> None:
    with pytest.raises(BatchError, match="not a complete step batch"):
        read_step_batch(tmp_path, 1, 0)
    write_step_batch(tmp_path, 1, [make_samples(1)])
    with pytest.raises(BatchError, match="1 trainer rank"):
        read_step_batch(tmp_path, 1, 1)


def test_wait_times_out_with_clear_message(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(BatchTimeoutError, match=r"step_4.*batch_timeout_s"):
        wait_for_step_batch(tmp_path, 4, 0, timeout_s=0.2)
    assert 0.2 <= time.monotonic() - start < 2.0


def test_wait_returns_when_batch_appears(tmp_path: Path) -> None:
    samples = make_samples(3)
    writer = threading.Timer(0.15, lambda: write_step_batch(tmp_path, 1, [samples]))
    writer.start()
    try:
        got = wait_for_step_batch(tmp_path, 1, 0, timeout_s=5.0)
    finally:
        writer.join()
    assert_same(got, samples)


def test_split_balances_tokens() -> None:
    samples = make_samples(40, seed=3)
    parts = split_across_ranks(samples, 3)
    assert len(parts) == 3
    loads = [sum(len(s) for s in p) for p in parts]
    assert max(loads) - min(loads) <= max(len(s) for s in samples)
    assert sorted(id(s) for p in parts for s in p) == sorted(id(s) for s in samples)
    assert split_across_ranks(samples[:1], 4)[1:] == [[], [], []]  # every rank gets a list


def test_trainer_progress(tmp_path: Path) -> None:
    assert read_trainer_progress(tmp_path) == 0
    write_trainer_progress(tmp_path, 5)
    assert read_trainer_progress(tmp_path) == 5


@pytest.mark.parametrize("content", [b"", b'{"step": 3', b"\xff", b"[3]", b'{"stp": 3}', b'{"step": "3"}', b'{"step": -1}', b'{"step": true}'])
def test_garbled_trainer_progress_is_a_clear_error_naming_the_file(tmp_path: Path, content: bytes) -> None:
    write_trainer_progress(tmp_path, 2)
    path = tmp_path / "trainer" / "progress.json"
    path.write_bytes(content)
    with pytest.raises(ProgressError, match=rf"{path}: unreadable trainer progress file .*delete the file and rerun") as info:
        read_trainer_progress(tmp_path)
    assert isinstance(info.value, ApprenticeError)
