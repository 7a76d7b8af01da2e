"""One rule for settings that both the trainer and accelerate have (`mixed_precision`): the command line wins over
the YAML (`--config`), the YAML over the accelerate config (`accelerate launch --mixed_precision` and the accelerate
config file reach the process as ACCELERATE_MIXED_PRECISION); every conflict is logged with both values."""

from __future__ import annotations

import logging
import os

import pytest
from tiny_pipeline import tiny_mmdit_pipeline, write_dataset

from mmdit_diffusers.training import parse_args, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = [os.path.join(ROOT, "configs", name) for name in ("train_tiny.yaml", "train_shapes.yaml")]


@pytest.fixture
def yaml_no(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text('pretrained_model_name_or_path: base\ntrain_data_dir: data\nmixed_precision: "no"\n')
    return config


def parse(config, tmp_path, *extra):
    return parse_args(["--config", str(config), "--output_dir", str(tmp_path / "out"), *extra])


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mmdit_diffusers.train" and r.levelno == logging.WARNING]


def test_the_command_line_wins_over_the_yaml_and_says_so(yaml_no, tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    args = parse(yaml_no, tmp_path, "--mixed_precision", "bf16")
    assert args.mixed_precision == "bf16"
    assert warnings_of(caplog) == [f"--mixed_precision bf16 (command line) overrides mixed_precision: no in --config {yaml_no}."]


def test_the_yaml_wins_over_the_accelerate_config_and_says_so(yaml_no, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    args = parse(yaml_no, tmp_path)
    assert args.mixed_precision == "no"
    (message,) = warnings_of(caplog)
    assert message.startswith(f"mixed_precision: no in --config {yaml_no} overrides the accelerate config's mixed "
                              "precision bf16 (ACCELERATE_MIXED_PRECISION")


def test_the_command_line_wins_over_the_yaml_and_the_accelerate_config(yaml_no, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    args = parse(yaml_no, tmp_path, "--mixed_precision", "bf16")
    assert args.mixed_precision == "bf16"
    first, second = warnings_of(caplog)
    assert "overrides mixed_precision: no in --config" in first
    assert second.startswith("--mixed_precision bf16 (command line) overrides the accelerate config's mixed precision fp16")


@pytest.mark.parametrize("config", SHIPPED, ids=os.path.basename)
def test_the_shipped_yamls_leave_mixed_precision_to_accelerate(config, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    args = parse(config, tmp_path, "--pretrained_model_name_or_path", "base", "--train_data_dir", "data")
    assert args.mixed_precision is None and not warnings_of(caplog)


@pytest.mark.usefixtures("fresh_accelerate")
@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # torch's rms_norm under CPU bf16 autocast
def test_accelerate_launch_precision_reaches_a_run_of_the_shipped_yaml(tmp_path, monkeypatch):
    """docs/training.md's `accelerate launch --mixed_precision bf16 ... --config configs/train_tiny.yaml`: the run
    trains in bf16 (the model card says which precision was in effect)."""
    base = tmp_path / "base"
    tiny_mmdit_pipeline(seed=0, layout="sd3", masked=True).save_pretrained(base)
    data = write_dataset(tmp_path / "data", n=4)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    result = train(parse_args([
        "--config", SHIPPED[0], "--pretrained_model_name_or_path", str(base), "--train_data_dir", data,
        "--output_dir", str(tmp_path / "out"), "--max_train_steps", "1", "--train_batch_size", "2",
        "--validation_inference_steps", "1", "--num_validation_images", "1", "--report_to", "none"]))
    assert result.card_data["training"]["mixed precision"] == "bf16"
