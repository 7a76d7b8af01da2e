"""A run owns its `--output_dir` (`mmdit_diffusers.training.run_folder`): another run's folder is refused unless
`--overwrite_output_dir` or a resume of that run; `--checkpoints_total_limit` removes only this run's checkpoints;
the final export is swapped in (an interrupted one leaves the old pipeline); a second live run is stopped by the
lock; a worker of `accelerate launch` ends with its launcher."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil  # an accelerate dependency
import pytest
import safetensors.torch
from safetensors.torch import load_file
from tiny_pipeline import write_dataset

from mmdit_diffusers import MMDiTPipeline
from mmdit_diffusers.errors import InputError
from mmdit_diffusers.train import main
from mmdit_diffusers.training import checkpointing, export, parse_args, train

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return write_dataset(tmp_path_factory.mktemp("data") / "images", n=4, solid=True)


def argv(base, data, out, *extra) -> list[str]:
    return ["--pretrained_model_name_or_path", str(base), "--train_data_dir", str(data), "--output_dir", str(out),
            "--resolution", "32", "--train_batch_size", "2", "--max_train_steps", "2", "--max_sequence_length", "8",
            "--seed", "0", "--report_to", "none", "--checkpointing_steps", "1", "--cache_text_embeddings",
            "--learning_rate", "1e-3", *map(str, extra)]


def run(*args):
    return train(parse_args(list(args)))


def checkpoint_runs(out) -> dict[str, str | None]:
    return {os.path.basename(p): checkpointing.run_id_of(p) for _, p in checkpointing.list_checkpoints(str(out))}


def weights(out) -> dict:
    return load_file(os.path.join(out, "transformer", "diffusion_pytorch_model.safetensors"))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_a_new_run_is_refused_in_another_runs_folder_resume_and_overwrite_are_not(capsys, caplog, base_dir, data_dir,
                                                                                  tmp_path):
    out = tmp_path / "out"
    run(*argv(base_dir, data_dir, out))
    exported = weights(out)

    # a new run into the folder: refused before anything is written, naming the folder and the ways out
    code = main(argv(base_dir, data_dir, out, "--max_train_steps", "1", "--learning_rate", "5e-2"))
    err = capsys.readouterr().err
    assert code == 2, err
    first = json.loads((out / "run.json").read_text())["run_id"]
    for fragment in (str(out), "checkpoint-1", first, "--overwrite_output_dir", "--resume_from_checkpoint latest"):
        assert fragment in err, (fragment, err)
    assert checkpoint_runs(out) == {"checkpoint-1": first, "checkpoint-2": first}
    assert same(weights(out), exported)

    # resuming that run is allowed and continues it: same run id, the later checkpoint, a new export; a changed
    # training option is named in a warning (the longer run is not)
    run(*argv(base_dir, data_dir, out, "--resume_from_checkpoint", "latest", "--max_train_steps", "3",
              "--learning_rate", "2e-3"))
    assert "other options than it started with: learning_rate." in caplog.text
    assert json.loads((out / "run.json").read_text())["run_id"] == first
    assert checkpoint_runs(out) == {"checkpoint-1": first, "checkpoint-2": first, "checkpoint-3": first}
    assert not same(weights(out), exported)

    # --overwrite_output_dir: a new run; the old run's checkpoints are gone, the limit keeps the new run's newest
    run(*argv(base_dir, data_dir, out, "--overwrite_output_dir", "--checkpoints_total_limit", "1"))
    second = json.loads((out / "run.json").read_text())["run_id"]
    assert second != first
    assert checkpoint_runs(out) == {"checkpoint-2": second}
    assert MMDiTPipeline.from_pretrained(out).transformer is not None
    # ... and `latest` now resumes the new run
    run(*argv(base_dir, data_dir, out, "--resume_from_checkpoint", "latest", "--max_train_steps", "3"))
    assert checkpoint_runs(out) == {"checkpoint-2": second, "checkpoint-3": second}


def test_resuming_another_runs_checkpoint_into_a_folder_is_refused(base_dir, data_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run(*argv(base_dir, data_dir, a, "--max_train_steps", "1"))
    run(*argv(base_dir, data_dir, b, "--max_train_steps", "1"))
    with pytest.raises(InputError, match="continues run") as refused:
        run(*argv(base_dir, data_dir, b, "--resume_from_checkpoint", a / "checkpoint-1"))
    assert str(b) in str(refused.value)
    # --overwrite_output_dir cannot resume a checkpoint it would delete
    with pytest.raises(InputError, match="--overwrite_output_dir"):
        run(*argv(base_dir, data_dir, b, "--overwrite_output_dir", "--resume_from_checkpoint", "latest"))
    # a folder that holds nothing of a run yet takes the resumed run
    c = tmp_path / "c"
    run(*argv(base_dir, data_dir, c, "--resume_from_checkpoint", a / "checkpoint-1"))
    run_a = json.loads((a / "run.json").read_text())["run_id"]
    assert json.loads((c / "run.json").read_text())["run_id"] == run_a
    assert checkpoint_runs(c) == {"checkpoint-2": run_a}


def _fake_checkpoint(out, step: int, run_id: str | None) -> None:
    folder = out / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    state = {"global_step": step, **({"run_id": run_id} if run_id else {})}
    (folder / checkpointing.STATE_FILE).write_text(json.dumps(state))


def test_the_total_limit_counts_and_removes_only_this_runs_checkpoints(tmp_path):
    """Old code kept the newest N checkpoints by step, whoever saved them: another run's checkpoint-100 and -200
    survived and this run's checkpoint-1..3 were deleted."""
    for step, run_id in ((100, "old"), (200, "old"), (50, None), (1, "new"), (2, "new"), (3, "new")):
        _fake_checkpoint(tmp_path, step, run_id)
    removed = checkpointing.rotate(str(tmp_path), 2, "new")
    assert [os.path.basename(p) for p in removed] == ["checkpoint-1"]
    assert checkpoint_runs(tmp_path) == {"checkpoint-2": "new", "checkpoint-3": "new", "checkpoint-50": None,
                                         "checkpoint-100": "old", "checkpoint-200": "old"}


def test_an_interrupted_export_leaves_the_old_pipeline_loadable(base_dir, data_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run(*argv(base_dir, data_dir, out))
    old_weights, old_config = weights(out), (out / "transformer" / "config.json").read_text()
    real_save = safetensors.torch.save_file

    def save_half_then_fail(tensors, filename, metadata=None):
        if os.path.basename(os.path.dirname(filename)) != "transformer":
            return real_save(tensors, filename, metadata=metadata)
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", save_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        run(*argv(base_dir, data_dir, out, "--resume_from_checkpoint", "latest", "--max_train_steps", "3"))
    monkeypatch.undo()
    assert same(weights(out), old_weights)
    assert (out / "transformer" / "config.json").read_text() == old_config
    assert MMDiTPipeline.from_pretrained(out).transformer is not None
    assert not [n for n in os.listdir(out) if n.startswith(".export-")]


def _pipeline(folder, version: str, components) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "P", "_version": version,
                                                         **{c: ["lib", "Cls"] for c in components}}))
    for c in components:
        (folder / c).mkdir()
        (folder / c / "weights").write_text(version)


def _state(out) -> str:
    """"old" or "new" for a complete pipeline (index and every component of the same export), "none" without an
    index; a mixed pipeline fails the test."""
    index_path = out / "model_index.json"
    if not index_path.exists():
        return "none"
    index = json.loads(index_path.read_text())
    versions = {(out / c / "weights").read_text() for c in index if not c.startswith("_")}
    assert versions == {index["_version"]}, (index, versions)
    return index["_version"]


def test_a_kill_at_any_rename_of_the_swap_leaves_the_old_or_no_pipeline_and_the_next_start_finishes(tmp_path, monkeypatch):
    real_replace = os.replace
    old_parts, new_parts = ["scheduler", "text_encoder_3", "transformer", "vae"], ["scheduler", "transformer", "vae"]
    stopped_at = 0
    while True:
        out = tmp_path / f"case-{stopped_at}"
        _pipeline(out, "old", old_parts)
        _pipeline(out / export.READY, "new", new_parts)
        calls = []

        def replace(src, dst):
            if len(calls) == stopped_at:
                raise KeyboardInterrupt  # the kill
            calls.append(src)
            real_replace(src, dst)

        monkeypatch.setattr(os, "replace", replace)
        try:
            export.swap_in_pipeline(str(out))
            finished = True
        except KeyboardInterrupt:
            finished = False
        monkeypatch.setattr(os, "replace", real_replace)
        assert _state(out) in (("new",) if finished else ("old", "none"))
        export.finish_interrupted_export(str(out))  # what the next start of a run does
        assert _state(out) == "new"
        assert sorted(os.listdir(out)) == ["model_index.json", *new_parts]
        if finished:
            break
        stopped_at += 1
    assert stopped_at >= 6  # every rename of the swap was interrupted once


def test_a_second_live_run_is_refused_with_the_pid_of_the_first(capsys, base_dir, data_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # a live run's main process: it holds an flock on output_dir/.run.lock, which holds its pid
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; f = open(sys.argv[1], 'a+'); "
         "fcntl.flock(f, fcntl.LOCK_EX); f.write(str(os.getpid())); f.flush(); print('locked', flush=True); "
         "time.sleep(120)", str(out / ".run.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code = main(argv(base_dir, data_dir, out))
        err = capsys.readouterr().err
        assert code == 2, err
        assert f"pid {holder.pid}" in err and "in use by another live run" in err
        assert not checkpointing.list_checkpoints(str(out)) and not (out / "model_index.json").exists()
    finally:
        holder.kill()
        holder.wait()
    assert main(argv(base_dir, data_dir, out, "--max_train_steps", "1")) == 0  # the lock ends with its process


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_a_worker_of_accelerate_launch_ends_when_the_launcher_is_killed(base_dir, data_dir, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mmdit_diffusers.train",
           *argv(base_dir, data_dir, out, "--max_train_steps", "100000")]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    launcher = subprocess.Popen(cmd, env={**env, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    worker = None
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoint-1").exists():
            assert launcher.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint-1 in time"
            time.sleep(0.05)
        [child] = psutil.Process(launcher.pid).children()  # the training process
        worker = child.pid
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 60
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(worker), "the worker kept training after its launcher was killed"
        assert int((out / ".run.lock").read_text()) == worker  # the lock named the main process
    finally:
        if worker and _alive(worker):
            os.kill(worker, signal.SIGKILL)
