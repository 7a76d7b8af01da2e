"""Atomic checkpoints: `accelerator.save_state` into a temporary folder, then one rename.

    output_dir/.tmp-checkpoint-N   being written (every process writes its part; ignored by resume)
    output_dir/checkpoint-N        complete: renamed from the temporary folder after `training_state.json`,
                                   the last file, is written and everything is flushed to disk

A process killed at any moment therefore leaves only complete `checkpoint-N` folders (plus perhaps a
temporary one, removed at the next start). Rotation renames the old folder to `.deleting-checkpoint-N` before
deleting it, so a kill during deletion cannot leave a half-deleted folder that looks complete.

`training_state.json` holds the run id (`run_folder`), the optimizer step, the micro-batch position of the data
stream and the seed, which is all the loop needs besides what `load_state` restores (weights, optimizer, LR
scheduler, gradient scaler, the accelerate step counter, RNG states and the registered objects: EMA and the
training generator).

Why not `files.atomic_directory`: every process writes its part of the folder (`save_state`), so the staging
folder must have a name all processes know, and resume and clean-up must recognise leftovers by name
(`.tmp-checkpoint-N`, `.deleting-checkpoint-N`); the durability steps (fsync, then one rename) are the same.
"""

from __future__ import annotations

import json
import os
import re
import shutil

from ..errors import InputError
from ..files import fsync_directory, fsync_tree, safetensors_problem

PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-checkpoint-"
DELETING_PREFIX = ".deleting-checkpoint-"
STATE_FILE = "training_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def is_checkpoint(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, STATE_FILE))


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints in `output_dir` as (step, path), oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _NAME.match(name)
        path = os.path.join(output_dir, name)
        if match and is_checkpoint(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> str | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def resolve_resume(value: str | None, output_dir: str) -> str | None:
    """`latest` -> the newest complete checkpoint in output_dir (None if there is none: a fresh start);
    a path (or a `checkpoint-N` name inside output_dir) must be a complete checkpoint."""
    if not value:
        return None
    if value == "latest":
        return latest_checkpoint(output_dir)
    candidates = [value] if os.path.isabs(value) else [value, os.path.join(output_dir, value)]
    for path in candidates:
        if is_checkpoint(path):
            return os.path.abspath(path)
    for path in candidates:
        if os.path.isdir(path):
            raise InputError(
                f"--resume_from_checkpoint {value!r}: {path} is not a complete checkpoint (no {STATE_FILE}); "
                f"complete ones in {output_dir}: {[os.path.basename(p) for _, p in list_checkpoints(output_dir)] or 'none'}."
            )
    raise InputError(
        f"--resume_from_checkpoint {value!r}: no such checkpoint (looked for {', '.join(candidates)}); use a "
        f"checkpoint-N folder or 'latest'."
    )


def read_state(path: str) -> dict:
    try:
        with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
            state = json.load(f)
    except OSError as e:
        raise InputError(f"cannot read {os.path.join(path, STATE_FILE)}: {e}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"checkpoint {path} is damaged: {STATE_FILE} is not valid JSON ({e}).") from None
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        raise InputError(f"checkpoint {path} is damaged: {STATE_FILE} has no integer global_step.")
    return state


def damaged_files(path: str) -> list[str]:
    """What is wrong with the files of checkpoint `path` ("model.safetensors is truncated: ..."), empty when each
    file is complete: safetensors headers against their sizes, torch's zip archives (`.bin`, `.pt`, `.pkl`)
    entry by entry, JSON files parsed."""
    import zipfile

    problems = []
    for root, _, names in os.walk(path):
        if ".metadata" in names:  # a sharded (torch.distributed.checkpoint) state, FSDP's
            problems += [f"{os.path.relpath(root, path)}/{p}" for p in _sharded_problems(root)]
        for name in sorted(names):
            file = os.path.join(root, name)
            shown = os.path.relpath(file, path)
            if name.endswith(".safetensors"):
                problem = safetensors_problem(file)
            elif name.endswith((".bin", ".pt", ".pth", ".pkl")):
                try:
                    with zipfile.ZipFile(file) as archive:
                        bad = archive.testzip()
                    problem = None if bad is None else f"has a damaged entry {bad}"
                except (zipfile.BadZipFile, OSError, EOFError) as e:
                    problem = f"is not a complete torch archive ({e})"
            elif name.endswith(".json"):
                try:
                    with open(file, encoding="utf-8") as f:
                        json.load(f)
                    problem = None
                except (OSError, ValueError) as e:
                    problem = f"is not valid JSON ({e})"
            else:
                continue
            if problem:
                problems.append(f"{shown} {problem}")
    return problems


def _sharded_problems(folder: str) -> list[str]:
    """What is wrong with a torch.distributed.checkpoint folder: its index (`.metadata`, read as that library
    reads it when loading) unreadable, or a shard (`.distcp`) missing or shorter than the bytes the index
    places in it."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(folder).read_metadata()
    except Exception as e:  # noqa: BLE001 - any failure to read the index is damage
        return [f".metadata is not a complete checkpoint index ({type(e).__name__})"]
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    problems = []
    for name, size in sorted(needed.items()):
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            problems.append(f"{name} is missing")
        elif os.path.getsize(file) < size:
            problems.append(f"{name} is truncated ({os.path.getsize(file)} of {size} bytes)")
    return problems


def run_id_of(path: str) -> str | None:
    """The `run_id` checkpoint `path` was saved by (None: unreadable, or saved before run ids existed)."""
    try:
        with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError):
        return None
    return state.get("run_id") if isinstance(state, dict) else None


def remove_checkpoint(path: str) -> None:
    """Rename out of the `checkpoint-N` namespace first, then delete."""
    parent, name = os.path.split(path)
    doomed = os.path.join(parent, DELETING_PREFIX + name[len(PREFIX):])
    if os.path.exists(doomed):
        shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def clean_temporary(output_dir: str) -> None:
    """Remove leftovers of an interrupted save or deletion (main process, at start)."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        if name.startswith((TMP_PREFIX, DELETING_PREFIX)):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def rotate(output_dir: str, total_limit: int | None, run_id: str | None) -> list[str]:
    """Keep the newest `total_limit` complete checkpoints of run `run_id`; returns the removed paths. Checkpoints
    of any other run (or without a run id) are never counted nor removed."""
    if not total_limit:
        return []
    found = [path for _, path in list_checkpoints(output_dir) if run_id_of(path) == run_id]
    removed = found[: max(0, len(found) - total_limit)]
    for path in removed:
        remove_checkpoint(path)
    return removed


def save_checkpoint(accelerator, output_dir: str, step: int, state: dict, total_limit: int | None = None) -> str:
    """Save the full training state as `output_dir/checkpoint-{step}` atomically; all processes call this.
    `state["run_id"]` names the run, whose older checkpoints beyond `total_limit` are then removed."""
    tmp = os.path.join(output_dir, f"{TMP_PREFIX}{step}")
    final = os.path.join(output_dir, f"{PREFIX}{step}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
            json.dump({**state, "global_step": step}, f, indent=2)
        fsync_tree(tmp)
        if os.path.exists(final):
            remove_checkpoint(final)
        os.replace(tmp, final)
        fsync_directory(output_dir)
        rotate(output_dir, total_limit, state.get("run_id"))
    accelerator.wait_for_everyone()
    return final
