"""The manifest of a directory hand-off: chunked sha256 computed in parallel, whole-file sha256 of older manifests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from apprentice.handoff import manifest
from apprentice.handoff.paths import MANIFEST


def test_chunked_digest_is_the_sha256_of_the_chunk_digests_and_catches_one_flipped_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(manifest, "CHUNK_BYTES", 1000)
    data = bytes(range(256)) * 10  # 2560 bytes: chunks of 1000, 1000, 560
    (tmp_path / "w.bin").write_bytes(data)
    (tmp_path / "empty").write_bytes(b"")
    written = manifest.write_manifest(tmp_path, 1)
    expected = hashlib.sha256(b"".join(hashlib.sha256(data[i : i + 1000]).digest() for i in (0, 1000, 2000)))
    assert written["algorithm"] == manifest.ALGORITHM
    assert written["files"]["w.bin"] == {"size": 2560, "sha256": expected.hexdigest()}
    assert written["files"]["empty"]["sha256"] == hashlib.sha256(hashlib.sha256(b"").digest()).hexdigest()
    manifest.verify_manifest(tmp_path)

    flipped = bytearray(data)
    flipped[2300] ^= 1  # in the last, short chunk
    (tmp_path / "w.bin").write_bytes(bytes(flipped))
    with pytest.raises(manifest.ManifestError, match="w.bin: sha256 mismatch"):
        manifest.verify_manifest(tmp_path)


def test_a_manifest_of_whole_file_sha256_still_verifies(tmp_path: Path) -> None:
    data = b"written by an older apprentice"
    (tmp_path / "trainer_state.json").write_bytes(data)
    files = {"trainer_state.json": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}}
    (tmp_path / MANIFEST).write_text(json.dumps({"format": 2, "algorithm": "sha256", "files": files}))
    manifest.verify_manifest(tmp_path)
    (tmp_path / "trainer_state.json").write_bytes(data.upper())
    with pytest.raises(manifest.ManifestError, match="sha256 mismatch"):
        manifest.verify_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"algorithm": "md5", "files": files}))
    with pytest.raises(manifest.ManifestError, match="unknown algorithm 'md5'"):
        manifest.verify_manifest(tmp_path)
