"""Writing files and folders so that a reader never sees half of one: write beside, then rename; and checking an
output path before the work that fills it.

`os.replace` within one folder is atomic on POSIX and Windows, so a kill at any moment leaves either the old
complete file (or folder) or the new one, never a mix. Temporary names start with "." and are removed on failure.
`atomic_file(path, overwrite=False)` publishes with a hard link instead, which fails rather than replace a file
that appeared meanwhile.

`is_missing_local_path(path)` tells a mistyped local path from a Hub repo id. `safetensors_problem(path)` says
why a weights file is damaged, from its header. `config_class_name(path)` is the `_class_name` of a config.json
(None when it is unreadable). `output_problem(path, overwrite)` and `folder_problem(path)` say,
before any work, why a file or folder could not be written (it exists, a file stands where a folder should, the place is read-only), or None; the callers turn
the answer into an `InputError` naming their option. `free_path(path)` is `path`, or `name-2.png`, `name-3.png`,
... when that exists.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
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
def atomic_file(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None,
                overwrite: bool = True) -> Iterator[IO]:
    """Open a temporary file beside `path` for writing; on success it is flushed, fsynced and renamed to `path`
    (an existing file is replaced; with `overwrite=False` a `FileExistsError` is raised instead, and the file
    that is there is left alone), with ordinary permissions (0o644 less the umask)."""
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
        if overwrite:
            os.replace(tmp, path)
        else:
            _publish_without_replacing(tmp, path)
        fsync_directory(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _publish_without_replacing(tmp: str, path: Path) -> None:
    """Give the finished temporary file its name unless that name exists (a hard link is atomic and fails on an
    existing name); file systems without hard links get the check and the rename, not atomic together."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"{path} exists") from None
    except OSError:
        if path.exists():
            raise FileExistsError(f"{path} exists") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


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


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def folder_problem(path: str | os.PathLike) -> str | None:
    """Why files could not be created in folder `path` (made if missing), or None: a file stands in its place
    or in its parents', or the place is not writable (tried with a temporary file, removed at once)."""
    path = Path(path)
    existing = _nearest_existing(path)
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=existing)
    except OSError as error:
        return f"{existing} is not writable ({error.strerror or error})"
    os.close(fd)
    os.unlink(probe)
    return None


def output_problem(path: str | os.PathLike, overwrite: bool = False) -> str | None:
    """Why the file `path` could not be written, or None: it exists (unless `overwrite`), it is a folder, or its
    folder cannot be written (see `folder_problem`)."""
    path = Path(path)
    if path.is_dir():
        return "is a folder; expected a file name"
    if path.exists() and not overwrite:
        return "exists; pass --overwrite to replace it, or choose another name"
    return folder_problem(path.parent)


_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


def is_missing_local_path(path: str | os.PathLike) -> bool:
    """Whether `path` names nothing on disk and cannot be a Hub repo id ("org/name"): a local path given wrong, which
    loaders should refuse rather than send to the Hub."""
    text = os.fspath(path)
    return not os.path.exists(text) and (_REPO_ID.fullmatch(text) is None or text.startswith((".", "/")))


def free_path(path: str | os.PathLike) -> Path:
    """`path` if nothing is there, else the first of `stem-2.ext`, `stem-3.ext`, ... that is free."""
    path = Path(path)
    number = 1
    candidate = path
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.stem}-{number}{path.suffix}")
    return candidate


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """Why `path` is not a complete safetensors file, or None. Reads the header only: 8 bytes (little-endian
    header length), a JSON header whose `data_offsets` give each tensor's bytes, then exactly those bytes."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if size == 0:
                return "is empty (0 bytes)"
            if len(head) < 8:
                return f"is {size} bytes, too short for a safetensors header"
            header_length = int.from_bytes(head, "little")
            if header_length > size - 8:
                return (f"is not a complete safetensors file: its first 8 bytes announce a {header_length:,}-byte "
                        f"header, but the file has {size:,} bytes (truncated, or not safetensors)")
            header = json.loads(f.read(header_length).decode("utf-8"))
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"
    except (UnicodeDecodeError, ValueError):
        return "is not a safetensors file (its header is not JSON)"
    if not isinstance(header, dict):
        return "is not a safetensors file (its header is not a JSON object)"
    ends = [entry["data_offsets"][1] for name, entry in header.items()
            if name != "__metadata__" and isinstance(entry, dict) and len(entry.get("data_offsets", ())) == 2]
    expected = 8 + header_length + max(ends, default=0)
    if size < expected:
        return f"is truncated: its header describes {expected:,} bytes, the file has {size:,}"
    return None


def safetensors_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from the header of a complete safetensors file (see `safetensors_problem`)."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")).decode("utf-8"))
    return {name: tuple(entry["shape"]) for name, entry in header.items() if name != "__metadata__"}


def config_class_name(config_path: str | os.PathLike) -> str | None:
    """The `_class_name` of a `config.json` / `model_index.json`; None when it is missing, unreadable or names none."""
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    return config.get("_class_name") if isinstance(config, dict) else None
