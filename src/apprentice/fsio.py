"""Durable, atomic files and directories: the one way apprentice writes anything a reader may look at.

A reader (another process, a resumed run, another node on a shared filesystem) sees either the old content or
the new one, never a partial file: data goes to a temporary name in the same directory, is fsync'ed, renamed
over the target, and the directory is fsync'ed so the rename itself survives a power cut. Files are created
with mode 0o644 and directories 0o755 (subject to the umask): nothing apprentice writes holds a secret.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

FILE_MODE = 0o644
DIR_MODE = 0o755


def fsync_dir(path: Path) -> None:
    """Make a rename or creation inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def make_dirs(path: Path) -> None:
    """`mkdir -p` where every directory created gets DIR_MODE (minus the umask), as `atomic_dir` gives its own."""
    path = Path(path)
    if path.is_dir():
        return
    make_dirs(path.parent)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=DIR_MODE)


def set_modes(root: Path) -> None:
    """Give every file below `root` FILE_MODE and every directory DIR_MODE (minus the umask), whatever wrote them
    (torch, safetensors and transformers create files with their own modes)."""
    os.chmod(root, DIR_MODE & ~_umask())
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), DIR_MODE & ~_umask())
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), FILE_MODE & ~_umask())


def write_bytes(path: Path, data: bytes) -> None:
    """Atomically and durably replace `path` with `data` (parents are created)."""
    path = Path(path)
    make_dirs(path.parent)
    # The temporary file is created with the final mode (mkstemp would make it 0600): a kill -9 between create and
    # rename may leave it behind, and it must not be the one file of the run with other permissions.
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def _create_temp(path: Path) -> tuple[int, str]:
    """Create `.NAME.<random>.tmp` beside `path` exclusively, with FILE_MODE (the umask applies)."""
    for _ in range(100):
        tmp = os.path.join(path.parent, f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file beside {path}")


def write_text(path: Path, text: str) -> None:
    """Atomically and durably replace `path` with UTF-8 `text`."""
    write_bytes(path, text.encode("utf-8"))


def sync_tree(root: Path) -> None:
    """fsync every file and directory below `root` (before it is renamed into place)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished directory `src` to `dst`; an existing `dst` is renamed aside first, then removed."""
    if dst.exists():
        trash = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.old-"))
        os.rename(dst, trash / dst.name)
        os.rename(src, dst)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(src, dst)
    fsync_dir(dst.parent)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside `final`; on success give its contents the standard modes, sync
    it and move it to `final`.

    On an exception the temporary directory is removed and `final` is left as it was.
    """
    final = Path(final)
    make_dirs(final.parent)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    os.chmod(tmp, DIR_MODE & ~_umask())
    try:
        yield tmp
        set_modes(tmp)
        sync_tree(tmp)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once at import: os.umask() is process-wide, so toggling it later could race with other threads' writes.
_UMASK = _read_umask()


def _umask() -> int:
    return _UMASK
