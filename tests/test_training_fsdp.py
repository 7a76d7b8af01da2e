"""FSDP2 training on CPU: `accelerate launch --config_file configs/accelerate_fsdp.yaml` with 2 gloo processes and
`MMDIT_FSDP_ON_CPU=1` runs accelerate's own FSDP2 path (`fully_shard`, sharded `save_state` / `load_state`, the
gathered export), as on GPUs.

One 4-step FSDP run with EMA (checkpoints at steps 2 and 4, validation at the end) is shared by the first tests:
its parameters are DTensors sharded over both processes, its checkpoints are torch.distributed.checkpoint shards of
the weights, optimizer and EMA, it equals a single-process run with the same global batch, and a resume from its
step-2 checkpoint ends exactly where it ended. LoRA under FSDP and the refusals follow.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from conftest import free_port
from safetensors.torch import load_file
from test_training import common, generate, max_abs_diff, run, subprocess_env, transformer_weights

from mmdit_diffusers import MMDiTPipeline, MMDiTTransformer2DModel
from mmdit_diffusers.errors import InputError
from mmdit_diffusers.training import distributed

pytestmark = pytest.mark.usefixtures("fresh_accelerate")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FSDP_CONFIG = os.path.join(ROOT, "configs", "accelerate_fsdp.yaml")
# EMA, caption dropout, random flips and a warmup + cosine schedule: every piece of state must survive a resume
EMA_RUN = ("--max_train_steps", "4", "--checkpointing_steps", "2", "--learning_rate", "1e-3", "--use_ema",
           "--ema_decay", "0.5", "--caption_dropout_prob", "0.3", "--random_flip", "--lr_scheduler", "cosine",
           "--lr_warmup_steps", "1")


def launch_fsdp(base, data, out, *extra, on_cpu: bool = True) -> subprocess.CompletedProcess:
    """2 processes, batch 2 each, under the shipped FSDP config (its bf16 replaced by `--mixed_precision no`)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", FSDP_CONFIG, "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "mmdit_diffusers.train", *common(base, data, out, *extra)]
    env = subprocess_env(ACCELERATE_USE_CPU="1")
    env.pop(distributed.FSDP_ON_CPU_ENV, None)
    if on_cpu:
        env[distributed.FSDP_ON_CPU_ENV] = "1"
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def dcp_contents(folder) -> dict:
    """A torch.distributed.checkpoint folder read back whole, without a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = str(folder) + ".pt"
    dcp_to_torch_save(str(folder), target)
    return torch.load(target, weights_only=False)


@pytest.fixture(scope="module")
def fsdp_run(base_dir, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "run"
    result = launch_fsdp(base_dir, data_dir, out, *EMA_RUN, "--validation_prompt", "a red circle",
                         "--num_validation_images", "1", "--validation_inference_steps", "2")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return out, result.stderr


@pytest.mark.slow
def test_fsdp_on_cpu_shards_the_transformer_over_both_processes(fsdp_run):
    out, log = fsdp_run
    found = re.search(r"FSDP2: (\d+) of (\d+) parameter tensors are DTensors sharded over 2 processes \(units: "
                      r"2 MMDiTBlock, and the root\); this process holds ([\d,]+) of ([\d,]+) values", log)
    assert found, log[-3000:]
    assert found.group(1) == found.group(2)
    local, total = (int(found.group(i).replace(",", "")) for i in (3, 4))
    assert 0.4 * total < local < 0.6 * total
    # the checkpoint holds each process's shards: for every weight, 2 chunks split along dim 0
    from torch.distributed.checkpoint import FileSystemReader

    for folder in ("pytorch_model_fsdp_0", "optimizer_0", distributed.EMA_FOLDER):
        assert sorted(n for n in os.listdir(out / "checkpoint-4" / folder) if n.endswith(".distcp")) == [
            "__0_0.distcp", "__1_0.distcp"]
    metadata = FileSystemReader(str(out / "checkpoint-4" / "pytorch_model_fsdp_0")).read_metadata()
    weights = {k: v for k, v in metadata.state_dict_metadata.items() if k.endswith(".weight")}
    assert weights
    for key, meta in weights.items():
        assert [c.offsets[0] for c in meta.chunks] == [0, meta.size[0] // 2], key
        assert sum(c.sizes[0] for c in meta.chunks) == meta.size[0], key


@pytest.mark.slow
def test_fsdp_run_equals_a_single_process_run(fsdp_run, base_dir, data_dir, tmp_path):
    """2 processes x batch 2 = 1 process x batch 4 (same examples, noise, sigmas): the same raw weights, the same
    EMA weights in the export (gathered from the shards), within float rounding."""
    out, _ = fsdp_run
    single = tmp_path / "single"
    run(common(base_dir, data_dir, single, *EMA_RUN, "--train_batch_size", "4"))
    sharded = dcp_contents(out / "checkpoint-4" / "pytorch_model_fsdp_0")["model"]
    raw = load_file(single / "checkpoint-4" / "model.safetensors")
    assert max_abs_diff(raw, sharded) <= 1e-5
    assert max_abs_diff(transformer_weights(out), transformer_weights(single)) <= 1e-5
    assert max_abs_diff(transformer_weights(out), transformer_weights(base_dir)) > 1e-4  # training moved them


@pytest.mark.slow
def test_fsdp_ema_is_saved_sharded_and_the_export_gathers_it(fsdp_run):
    out, _ = fsdp_run
    ema = dcp_contents(out / "checkpoint-4" / distributed.EMA_FOLDER)
    raw = dcp_contents(out / "checkpoint-4" / "pytorch_model_fsdp_0")["model"]
    shadow = ema["shadow"]
    assert ema["settings"]["optimization_step"] == 4 and shadow.keys() == raw.keys()
    exported = transformer_weights(out)
    assert max_abs_diff(exported, shadow) == 0.0  # the export is the EMA ...
    assert max_abs_diff(exported, raw) > 1e-5     # ... not the raw weights
    assert (out / "validation" / "final.png").is_file()
    pipe = MMDiTPipeline.from_pretrained(out)
    assert np.isfinite(generate(pipe)).all()


@pytest.mark.slow
def test_fsdp_resume_from_a_sharded_checkpoint_is_exact(fsdp_run, base_dir, data_dir, tmp_path):
    """Train 4 steps; separately, resume from the run's step-2 checkpoint: the same step-4 weights, optimizer state
    and EMA, bit for bit."""
    out, _ = fsdp_run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    result = launch_fsdp(base_dir, data_dir, resumed, *EMA_RUN, "--resume_from_checkpoint", "latest")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "Resuming from" in result.stderr
    for folder in ("pytorch_model_fsdp_0", distributed.EMA_FOLDER, "optimizer_0"):
        a = dcp_contents(out / "checkpoint-4" / folder)
        b = dcp_contents(resumed / "checkpoint-4" / folder)
        flat_a, flat_b = _tensors(a), _tensors(b)
        assert flat_a.keys() == flat_b.keys() and flat_a, folder
        assert all(torch.equal(flat_a[k], flat_b[k]) for k in flat_a), folder
    assert max_abs_diff(transformer_weights(out), transformer_weights(resumed)) == 0.0


def _tensors(tree, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _tensors(value, f"{prefix}/{key}").items()}
    return {}


@pytest.mark.slow
def test_lora_under_fsdp_equals_a_single_process_run(base_dir, data_dir, tmp_path):
    lora = ("--rank", "4", "--max_train_steps", "2", "--learning_rate", "1e-2", "--checkpointing_steps", "2")
    out = tmp_path / "lora"
    result = launch_fsdp(base_dir, data_dir, out, *lora)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "parameter tensors are DTensors sharded over 2 processes" in result.stderr
    single = tmp_path / "single"
    run(common(base_dir, data_dir, single, *lora, "--train_batch_size", "4"))
    name = "pytorch_lora_weights.safetensors"
    sharded, reference = load_file(out / name), load_file(single / name)
    assert max_abs_diff(sharded, reference) <= 1e-5
    assert max(v.abs().max().item() for k, v in sharded.items() if "lora_B" in k) > 1e-4  # B starts at zero
    pipe = MMDiTPipeline.from_pretrained(base_dir)
    pipe.load_lora_weights(out)
    assert np.isfinite(generate(pipe)).all()


@pytest.mark.slow
def test_the_fsdp_config_on_cpu_without_the_switch_is_refused(base_dir, data_dir, tmp_path):
    """accelerate runs an FSDP config on CPUs as DDP; the trainer stops and names both ways out."""
    out = tmp_path / "ddp"
    result = launch_fsdp(base_dir, data_dir, out, "--max_train_steps", "2", on_cpu=False)
    assert result.returncode != 0
    assert "asks for FSDP" in result.stderr and "as DDP" in result.stderr
    assert f"{distributed.FSDP_ON_CPU_ENV}=1" in result.stderr and "--multi_gpu" in result.stderr
    assert not out.exists() or not any(out.glob("checkpoint-*"))


def test_an_fsdp_config_in_a_single_process_is_refused(base_dir, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.delenv(distributed.FSDP_ON_CPU_ENV, raising=False)
    with pytest.raises(InputError, match=r"asks for FSDP .* FSDP needs several processes"):
        run(common(base_dir, data_dir, tmp_path / "out", "--max_train_steps", "1"))


def test_the_cpu_switch_without_an_fsdp_config_is_refused(base_dir, data_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.setenv(distributed.FSDP_ON_CPU_ENV, "1")
    with pytest.raises(InputError, match=r"MMDIT_FSDP_ON_CPU=1 .* configs/accelerate_fsdp.yaml"):
        run(common(base_dir, data_dir, tmp_path / "out", "--max_train_steps", "1"))


@pytest.mark.parametrize(("single_layers", "expected"), [(0, ["MMDiTBlock"]), (1, ["MMDiTBlock", "SingleStreamBlock"])])
def test_auto_wrap_takes_the_block_classes_the_model_has(single_layers, expected):
    """`_no_split_modules` names both block kinds; accelerate refuses a name the model lacks, so the trainer wraps
    the ones present."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    model = MMDiTTransformer2DModel(depth=1, hidden_size=32, num_heads=2, img_dim=16, txt_dim=16, cond_dim=16,
                                    in_channels=4, num_single_layers=single_layers, img_tokens=16, txt_tokens=8,
                                    txt_pre_only_last_block=single_layers == 0)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    if single_layers == 0:  # what accelerate does with `_no_split_modules` as they are
        with pytest.raises(ValueError, match="SingleStreamBlock"):
            FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap").set_auto_wrap_policy(model)
    distributed.wrap_blocks(types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=plugin)), model)
    assert plugin.transformer_cls_names_to_wrap == expected
    plugin.set_auto_wrap_policy(model)
    wrapped = {type(m).__name__ for m in model.modules() if plugin.auto_wrap_policy(m, recurse=False, nonwrapped_numel=0)}
    assert wrapped == set(expected)


@pytest.mark.parametrize("damage", ["truncated", "missing", "index"])
def test_a_damaged_sharded_checkpoint_is_named_file_by_file(damage, tmp_path):
    """FSDP's sharded states (torch.distributed.checkpoint) are checked like the other files of a checkpoint:
    a short or missing shard, or an unreadable index, is reported by name (resuming then says which checkpoint
    is damaged and which others exist, instead of the loader's own error)."""
    import torch.distributed.checkpoint as dcp

    from mmdit_diffusers.training.checkpointing import damaged_files

    folder = tmp_path / "checkpoint-4" / "pytorch_model_fsdp_0"
    dcp.save({"weight": torch.randn(64, 64), "bias": torch.randn(64)}, checkpoint_id=str(folder))
    assert damaged_files(str(tmp_path / "checkpoint-4")) == []
    shard = next(folder.glob("*.distcp"))
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:100])
    elif damage == "missing":
        shard.unlink()
    else:
        (folder / ".metadata").write_bytes(b"\x80\x04 not a pickle")
    problems = damaged_files(str(tmp_path / "checkpoint-4"))
    expected = {"truncated": f"{shard.name} is truncated", "missing": f"{shard.name} is missing",
                "index": ".metadata is not a complete checkpoint index"}[damage]
    assert len(problems) == 1 and problems[0].startswith("pytorch_model_fsdp_0/") and expected in problems[0], problems
