"""`--optimizer adamw|adamw8bit|prodigy` (`mmdit_diffusers.training.optimizers`), the step loop's logs
(loss, steps_per_s, images_per_s) and the non-finite check that runs once per optimizer step."""

from __future__ import annotations

import importlib.machinery
import os
import sys
import types

import pytest
import torch
from safetensors.torch import load_file
from tiny_pipeline import write_dataset

from mmdit_diffusers.errors import InputError
from mmdit_diffusers.train import main
from mmdit_diffusers.training import TrainingDivergedError, loop, parse_args, train

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return write_dataset(tmp_path_factory.mktemp("data") / "images", n=4, solid=True)


def argv(base, data, out, *extra) -> list[str]:
    return ["--pretrained_model_name_or_path", str(base), "--train_data_dir", str(data), "--output_dir", str(out),
            "--resolution", "32", "--train_batch_size", "2", "--max_train_steps", "2", "--max_sequence_length", "8",
            "--seed", "0", "--report_to", "none", "--cache_text_embeddings", *map(str, extra)]


def fails(capsys, args, *fragments) -> None:
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def test_prodigy_trains_and_its_state_is_checkpointed(base_dir, data_dir, tmp_path):
    out = tmp_path / "out"
    result = train(parse_args(argv(base_dir, data_dir, out, "--optimizer", "prodigy", "--learning_rate", "1.0",
                                   "--checkpointing_steps", "2")))
    assert len(result.losses) == 2 and all(map(torch.isfinite, torch.tensor(result.losses)))
    groups = torch.load(out / "checkpoint-2" / "optimizer.bin", weights_only=False)["param_groups"]
    assert {"d", "d0", "beta3", "safeguard_warmup"} <= set(groups[0])  # Prodigy's own state, not AdamW's
    trained = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    base = load_file(os.path.join(base_dir, "transformer", "diffusion_pytorch_model.safetensors"))
    assert all(torch.isfinite(w).all() for w in trained.values())
    assert max((trained[k] - base[k]).abs().max().item() for k in base) > 0  # it stepped
    assert result.card_data["training"]["optimizer"] == "prodigy"
    # resuming with another optimizer is refused before any step
    with pytest.raises(InputError, match="--optimizer prodigy"):
        train(parse_args(argv(base_dir, data_dir, out, "--resume_from_checkpoint", "latest", "--max_train_steps", "3")))


def test_adamw8bit_is_refused_without_bitsandbytes_and_without_a_gpu(capsys, base_dir, data_dir, tmp_path,
                                                                    monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not importable, whether installed or not
    fails(capsys, argv(base_dir, data_dir, out, "--optimizer", "adamw8bit"), "--optimizer adamw8bit",
          "bitsandbytes", "pip install bitsandbytes")
    installed = types.ModuleType("bitsandbytes")
    installed.__spec__ = importlib.machinery.ModuleSpec("bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes", installed)
    fails(capsys, argv(base_dir, data_dir, out, "--optimizer", "adamw8bit"), "needs a CUDA GPU", "on cpu")
    assert not (out / "model_index.json").exists() and not list(out.glob("checkpoint-*"))


def test_optimizer_names(capsys, tmp_path):
    base = ["--pretrained_model_name_or_path", "p", "--train_data_dir", "d", "--output_dir", str(tmp_path)]
    assert parse_args(base).optimizer == "adamw"
    assert parse_args(base + ["--optimizer", "AdamW"]).optimizer == "adamw"  # diffusers' spelling
    with pytest.raises(InputError, match="--optimizer: invalid choice: 'sgd'"):
        parse_args(base + ["--optimizer", "sgd"])


def test_logs_hold_the_step_loss_and_throughput(base_dir, data_dir, tmp_path, monkeypatch):
    from accelerate import Accelerator

    logged = []
    monkeypatch.setattr(Accelerator, "log", lambda self, values, step=None, log_kwargs=None: logged.append((step, values)))
    result = train(parse_args(argv(base_dir, data_dir, tmp_path / "out", "--max_train_steps", "3",
                                   "--gradient_accumulation_steps", "2")))
    assert [step for step, _ in logged] == [1, 2, 3]
    for (_, values), loss in zip(logged, result.losses):
        assert {"loss", "lr", "grad_norm", "steps_per_s", "images_per_s"} <= set(values)
        assert values["loss"] == loss and values["steps_per_s"] > 0
        assert values["images_per_s"] == pytest.approx(values["steps_per_s"] * 2 * 2)  # batch 2 x accumulation 2


def test_a_non_finite_loss_in_an_early_micro_batch_stops_before_the_update(capsys, base_dir, data_dir, tmp_path,
                                                                            monkeypatch):
    """The check runs once per optimizer step, at its last micro-batch: a NaN in the first of two micro-batches
    must still stop the run before the optimizer applies the step."""
    real, calls = loop._compute_loss, []

    def nan_in_the_third_micro_batch(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(loop, "_compute_loss", nan_in_the_third_micro_batch)
    out = tmp_path / "out"
    with pytest.raises(TrainingDivergedError, match=r"the loss is nan at step 2 \(of 4\).*checkpoint-1"):
        train(parse_args(argv(base_dir, data_dir, out, "--max_train_steps", "4", "--gradient_accumulation_steps",
                              "2", "--checkpointing_steps", "1")))
    assert len(calls) == 4  # both micro-batches of step 2 ran; the check came after the second
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert not (out / "model_index.json").exists()
