"""Durable atomic writes: readers see the old content or the new, never a partial file or a stray temp."""

import os
from pathlib import Path

import pytest

from apprentice import fsio


def test_write_text_replaces_whole_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.json"
    fsio.write_text(target, "old")
    fsio.write_text(target, "new ✓")
    assert target.read_text(encoding="utf-8") == "new ✓"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.json"]
    assert os.stat(target).st_mode & 0o777 == fsio.FILE_MODE & ~fsio._umask()


def test_atomic_dir_failure_keeps_the_old_directory(tmp_path: Path) -> None:
    final = tmp_path / "step_1"
    with fsio.atomic_dir(final) as tmp:
        (tmp / "w.bin").write_bytes(b"v1")
    with pytest.raises(RuntimeError), fsio.atomic_dir(final) as tmp:
        (tmp / "w.bin").write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert (final / "w.bin").read_bytes() == b"v1"
    assert [p.name for p in tmp_path.iterdir()] == ["step_1"]
    with fsio.atomic_dir(final) as tmp:
        (tmp / "w.bin").write_bytes(b"v2")
    assert (final / "w.bin").read_bytes() == b"v2"
    assert [p.name for p in tmp_path.iterdir()] == ["step_1"]
