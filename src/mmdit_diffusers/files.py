"""Writing files and folders so that a reader never sees half of one: write beside, then rename.

`os.replace` within one folder is atomic on POSIX and Windows, so a kill at any moment leaves either the old
complete file (or folder) or the new one, never a mix. Temporary names start with "." and are removed on failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator


def fsync_directory(path: str | os.PathLike) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened, e.g. Windows)."""
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


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file beside `path` for writing; on success it is flushed, fsynced and renamed to `path`
    (an existing file is replaced), with ordinary permissions (0o644 less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates it private; the result is an ordinary file
        os.replace(tmp, path)
        fsync_directory(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path, "w", encoding="utf-8") as f:
        f.write(text)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and folder below `root` (before a rename makes it visible)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            try:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_directory(dirpath)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield an empty staging folder beside `path`; fill it, and on success it becomes `path`.

    An existing `path` is swapped out only once the new folder is complete (`replace=False` refuses to touch it:
    FileExistsError), then deleted; if the final rename fails the old folder is put back."""
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not replace:
        raise FileExistsError(f"{path} exists")
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    old: Path | None = None
    try:
        yield staging
        staging.chmod(0o755)  # mkdtemp makes it private
        fsync_tree(staging)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent)) / path.name
            os.replace(path, old)
        os.replace(staging, path)
        fsync_directory(path.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None and old.exists() and not path.exists():
            os.replace(old, path)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old.parent, ignore_errors=True)
