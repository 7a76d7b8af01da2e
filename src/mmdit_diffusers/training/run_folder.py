"""A run owns its `--output_dir`: a manifest, a lock, and the rules for starting in a folder that is not empty.

    output_dir/run.json    the owner: {"run_id", "config_hash", "config", "created"}, written when a run starts
    output_dir/.run.lock   held with `fcntl.flock` by the main process for the whole run; it holds that pid

`claim` (main process, before the first step) decides, under the lock:

- a second live run into the same folder is refused, naming the pid of the first;
- a new run (no `--resume_from_checkpoint`, or `latest` with no checkpoint) in a folder that holds checkpoints or an
  exported model (`model_index.json`, `pytorch_lora_weights.safetensors`) is refused unless
  `--overwrite_output_dir`, which removes the old run's checkpoints, validation grids, logs and summary (its
  exported model stays until the new export replaces it, so a failed new run destroys no model);
- a resume continues the run of its checkpoint (every checkpoint records `run_id`); it is refused when the folder
  holds another run's checkpoints or model. Checkpoints saved before run ids existed resume as before (a new id).

A run whose folder holds nothing of a run yet (e.g. one stopped by bad input before its first checkpoint) is
simply replaced. `stop_with_launcher` makes a process started by `accelerate launch` / torchrun end when its
launcher dies (Linux), so no orphaned worker keeps writing into the folder.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import uuid
from dataclasses import dataclass
from typing import IO

from ..errors import InputError
from ..files import write_text_atomically
from . import checkpointing, export

try:
    import fcntl
except ImportError:  # Windows: no lock (documented)
    fcntl = None

logger = logging.getLogger("mmdit_diffusers.train")

MANIFEST = "run.json"
LOCK = ".run.lock"
# options that may change between the sessions of one run without changing what it trains
_SESSION_OPTIONS = {"config", "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "seed", "max_train_steps",
                    "num_train_epochs", "checkpointing_steps", "checkpoints_total_limit", "report_to",
                    "tracker_project_name", "logging_dir", "dataloader_num_workers", "cache_latents",
                    "cache_text_embeddings", "embeddings_cache_dir", "gradient_checkpointing", "validation_prompt", "num_validation_images",
                    "validation_steps", "validation_inference_steps", "validation_guidance_scale", "push_to_hub",
                    "hub_model_id", "hub_private"}


@dataclass
class RunFolder:
    """The claim of one run on its folder: `run_id` (recorded in every checkpoint) and the held lock."""

    output_dir: str
    run_id: str
    lock: IO | None = None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.close()  # closing the file drops the flock; the file stays (its pid is then stale)
            self.lock = None


def run_config(args) -> dict:
    """The options that define what a run trains (not `_SESSION_OPTIONS`), as JSON-ready scalars."""
    from .args import args_to_config

    return {k: v for k, v in args_to_config(args).items() if k not in _SESSION_OPTIONS}


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def read_manifest(output_dir: str) -> dict | None:
    try:
        with open(os.path.join(output_dir, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def acquire_lock(output_dir: str) -> IO | None:
    """Hold `output_dir/.run.lock` (exclusive, not blocking) and write this pid into it; `InputError` with the
    holder's pid when another live process holds it. Released when the file is closed or the process ends."""
    if fcntl is None:
        return None
    handle = open(os.path.join(output_dir, LOCK), "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise InputError(
            f"--output_dir {output_dir} is in use by another live run (pid {holder}, holding {LOCK}); wait for it "
            "to end or stop it, or choose another --output_dir."
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _run_contents(output_dir: str) -> tuple[list[str], set]:
    """(what of a run the folder holds: checkpoint and model file names, the run ids these belong to)."""
    checkpoints = checkpointing.list_checkpoints(output_dir)
    owners = {checkpointing.run_id_of(path) for _, path in checkpoints}
    held = [os.path.basename(path) for _, path in checkpoints]
    held += [name for name in export.MODEL_FILES if os.path.isfile(os.path.join(output_dir, name))]
    manifest = read_manifest(output_dir)
    if manifest and manifest.get("run_id"):
        owners = {manifest["run_id"]}
    elif held and not checkpoints:
        owners = {"unknown"}  # an exported model without a manifest: a run of an older version, or a copy
    return held, owners


def _shown(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def _runs(owners: set) -> str:
    return _shown(sorted(str(o) if o else "saved without a run id" for o in owners))


def _remove_old_run(output_dir: str, logging_dir: str) -> None:
    """--overwrite_output_dir: the old run's checkpoints, grids, logs and summary (not its exported model)."""
    for _, path in checkpointing.list_checkpoints(output_dir):
        checkpointing.remove_checkpoint(path)
    logs = os.path.abspath(os.path.join(output_dir, logging_dir))
    for path in (os.path.join(output_dir, "validation"), logs):
        if os.path.isdir(path) and os.path.commonpath([path, output_dir]) == output_dir and path != output_dir:
            shutil.rmtree(path)
    summary = os.path.join(output_dir, "training_summary.json")
    if os.path.isfile(summary):
        os.unlink(summary)


def claim(output_dir: str, args, resume_path: str | None, resume_state: dict | None) -> RunFolder:
    """Take `output_dir` for this run (see the module docstring); writes the manifest. Main process only."""
    os.makedirs(output_dir, exist_ok=True)
    lock = acquire_lock(output_dir)
    try:
        checkpointing.clean_temporary(output_dir)
        export.finish_interrupted_export(output_dir)
        run_id = _check_owner(output_dir, args, resume_path, resume_state)
        config = run_config(args)
        manifest = read_manifest(output_dir) or {}
        if manifest.get("run_id") == run_id:
            changed = sorted(k for k in set(config) | set(manifest.get("config", {}))
                             if config.get(k) != manifest.get("config", {}).get(k))
            if changed:
                logger.warning(f"resuming run {run_id} with other options than it started with: {', '.join(changed)}.")
        else:
            manifest = {"run_id": run_id, "config_hash": config_hash(config), "config": config,
                        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
            write_text_atomically(os.path.join(output_dir, MANIFEST), json.dumps(manifest, indent=2))
    except BaseException:
        if lock is not None:
            lock.close()
        raise
    return RunFolder(output_dir, run_id, lock)


def _check_owner(output_dir: str, args, resume_path: str | None, resume_state: dict | None) -> str:
    """The id of this run, once the folder may be written by it; `InputError` otherwise."""
    held, owners = _run_contents(output_dir)
    overwrite = bool(args.overwrite_output_dir)
    options = ("choose another --output_dir, pass --overwrite_output_dir to replace that run, or "
               "--resume_from_checkpoint latest to continue it")
    if resume_path is None:
        if held and not overwrite:
            raise InputError(f"--output_dir {output_dir} holds another run's files ({_shown(held)}; run "
                             f"{_runs(owners)}); {options}.")
        if overwrite:
            _remove_old_run(output_dir, args.logging_dir)
        return uuid.uuid4().hex[:12]
    resumed = resume_state.get("run_id")
    inside = os.path.commonpath([os.path.abspath(resume_path), output_dir]) == output_dir
    if overwrite and inside:
        raise InputError(f"--overwrite_output_dir starts {output_dir} afresh, so it cannot resume {resume_path}, "
                         "which lies inside it; drop one of the two options.")
    if held and owners != {resumed}:
        if not overwrite:
            raise InputError(
                f"--output_dir {output_dir} holds another run's files ({_shown(held)}; run "
                f"{_runs(owners)}), and --resume_from_checkpoint {resume_path} continues run "
                f"{resumed or '(saved without a run id)'}; {options}."
            )
        _remove_old_run(output_dir, args.logging_dir)
    return resumed or uuid.uuid4().hex[:12]


def stop_with_launcher() -> bool:
    """In a process started by `accelerate launch` or torchrun (LOCAL_RANK / ACCELERATE_DYNAMO_BACKEND in the
    environment), ask Linux to send SIGTERM when the launcher ends (`prctl(PR_SET_PDEATHSIG)`), so a killed launcher
    leaves no worker writing into the output folder; if the launcher is already gone, end now. Returns whether the
    signal was set (False elsewhere: a shell's child is left alone, e.g. under `nohup`)."""
    launched = "LOCAL_RANK" in os.environ or "ACCELERATE_DYNAMO_BACKEND" in os.environ
    if not launched or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        if libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() == 1:  # the launcher died before the call: init adopted this process
        os.kill(os.getpid(), signal.SIGTERM)
    return True
