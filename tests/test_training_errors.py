"""Bad input to `mmdit_diffusers.train`: each problem is one line `error: ...` on stderr naming it, exit status 2,
no traceback, and no training step (no checkpoint, no model). A diverging run stops with status 1 and keeps
its latest checkpoint."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image
from tiny_pipeline import tiny_mmdit_pipeline, write_dataset

from mmdit_diffusers.train import main


pytestmark = pytest.mark.usefixtures("fresh_accelerate")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("base") / "pipeline"
    tiny_mmdit_pipeline(seed=0, layout="clip_t5", masked=True).save_pretrained(path)
    return str(path)




@pytest.fixture
def data_dir(tmp_path) -> str:
    return write_dataset(tmp_path / "data", n=4, solid=True)




def argv(base, data, out, *extra) -> list[str]:
    return ["--pretrained_model_name_or_path", str(base), "--train_data_dir", str(data), "--output_dir", str(out),
            "--resolution", "32", "--train_batch_size", "2", "--max_train_steps", "2", "--max_sequence_length", "8",
            "--seed", "0", "--report_to", "none", *extra]


def fails(capsys, args, *fragments, status: int = 2) -> str:
    """Run the CLI; it must return `status` and print `error: ...` containing every fragment, no traceback."""
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == status, err
    assert "error: " in err and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


def assert_no_training(out) -> None:
    if os.path.isdir(out):
        names = os.listdir(out)
        assert not [n for n in names if n.startswith("checkpoint-") or n == "model_index.json"], names


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------
def test_missing_data_folder(capsys, base_dir, tmp_path):
    fails(capsys, argv(base_dir, tmp_path / "nope", tmp_path / "out"), "--train_data_dir", "nope", "no such folder")
    assert_no_training(tmp_path / "out")


def test_images_without_captions(capsys, base_dir, tmp_path):
    data = tmp_path / "data"
    os.makedirs(data)
    Image.new("RGB", (32, 32)).save(data / "a.png")
    fails(capsys, argv(base_dir, data, tmp_path / "out"), "no metadata.jsonl", "1 image(s) without captions")
    write_dataset(data, n=2)
    Image.new("RGB", (32, 32)).save(data / "extra.png")
    fails(capsys, argv(base_dir, data, tmp_path / "out"), "images without captions", "a.png", "extra.png")
    assert_no_training(tmp_path / "out")


def test_metadata_line_for_a_missing_image(capsys, base_dir, tmp_path, data_dir):
    os.remove(os.path.join(data_dir, "0002.png"))
    fails(capsys, argv(base_dir, data_dir, tmp_path / "out"), "0002.png", "does not exist")


def test_caption_column_that_does_not_exist(capsys, base_dir, tmp_path, data_dir):
    fails(capsys, argv(base_dir, data_dir, tmp_path / "out", "--caption_column", "caption"),
          "caption column 'caption' not found", "metadata.jsonl", "'text'")
    assert_no_training(tmp_path / "out")


def test_unreadable_image(capsys, base_dir, tmp_path, data_dir):
    with open(os.path.join(data_dir, "0001.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n this is not an image")
    fails(capsys, argv(base_dir, data_dir, tmp_path / "out"), "unreadable image", "0001.png")
    assert_no_training(tmp_path / "out")


def test_dataset_name_without_datasets_installed(capsys, base_dir, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    args = argv(base_dir, "x", tmp_path / "out")
    i = args.index("--train_data_dir")
    args[i:i + 2] = ["--dataset_name", "someone/captions"]
    fails(capsys, args, "pip install datasets", "someone/captions")


def test_fewer_examples_than_one_batch(capsys, base_dir, tmp_path):
    data = write_dataset(tmp_path / "one", n=1)
    fails(capsys, argv(base_dir, data, tmp_path / "out"), "1 example(s)", "fewer than one global batch")
    assert_no_training(tmp_path / "out")


# ----------------------------------------------------------------------------------------------------------
# Model and sizes
# ----------------------------------------------------------------------------------------------------------
def test_resolution_not_divisible_by_vae_scale_times_patch(capsys, base_dir, tmp_path, data_dir):
    fails(capsys, argv(base_dir, data_dir, tmp_path / "out") + ["--resolution", "30"],
          "--resolution 30", "VAE scale factor x patch size = 2 x 2 = 4")
    assert_no_training(tmp_path / "out")


def test_resolution_larger_than_the_position_grid(capsys, base_dir, tmp_path, data_dir):
    fails(capsys, argv(base_dir, data_dir, tmp_path / "out") + ["--resolution", "128"], "--resolution 128",
          "position grid")


def test_text_longer_than_the_transformer_accepts(capsys, base_dir, tmp_path, data_dir):
    fails(capsys, argv(base_dir, data_dir, tmp_path / "out") + ["--max_sequence_length", "64"], "max_sequence_length")


def test_missing_pipeline_folder(capsys, tmp_path, data_dir):
    fails(capsys, argv(tmp_path / "no-pipeline", data_dir, tmp_path / "out"), "--pretrained_model_name_or_path",
          "no such folder")


def test_bad_model_config(capsys, base_dir, tmp_path, data_dir):
    fails(capsys, argv(base_dir, data_dir, tmp_path / "out", "--model_config", "huge"), "--model_config 'huge'", "tiny")
    fails(capsys, argv(base_dir, data_dir, tmp_path / "out", "--model_config", '{"hidden_size": 30, "num_heads": 4}'),
          "--model_config", "num_heads")


# ----------------------------------------------------------------------------------------------------------
# Command line and config file
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--learning_rat", "1e-4"], "unrecognized arguments: --learning_rat"),
        (["--resolution", "big"], "argument --resolution: invalid positive int value: 'big'"),
        (["--train_batch_size", "0"], "must be a positive integer"),
        (["--weighting_scheme", "lognormal"], "argument --weighting_scheme: invalid choice: 'lognormal'"),
        (["--caption_dropout_prob", "1.5"], "must be a probability"),
        (["--resolution_shift", "-2"], "positive number or 'scheduler'"),
        (["--learning_rate", "-1"], "argument --learning_rate: must be a positive number, got -1"),
        (["--model_config", "tiny", "--rank", "4"], "cannot be combined with LoRA"),
        (["--dataset_name", "x"], "exactly one of --train_data_dir"),
    ],
)
def test_bad_command_line(capsys, tmp_path, extra, fragment):
    fails(capsys, argv("base", "data", tmp_path / "out", *extra), fragment)


def test_missing_required_and_bad_config_file(capsys, tmp_path):
    fails(capsys, ["--train_data_dir", "d"], "--pretrained_model_name_or_path is required")
    config = tmp_path / "c.yaml"
    config.write_text("learning_rate: 1.0e-4\nlearnin_rate: 3\n")
    fails(capsys, ["--config", config], "unknown option 'learnin_rate'")
    config.write_text("use_ema: maybe\n")
    fails(capsys, ["--config", config], "use_ema must be true or false")
    fails(capsys, ["--config", tmp_path / "none.yaml"], "no such file")


def test_help_is_not_an_error(capsys):
    assert main(["--help"]) == 0
    assert "--pretrained_model_name_or_path" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------
def test_resume_path_without_a_checkpoint(capsys, base_dir, tmp_path, data_dir):
    out = tmp_path / "out"
    fails(capsys, argv(base_dir, data_dir, out, "--resume_from_checkpoint", tmp_path / "checkpoint-9"),
          "--resume_from_checkpoint", "no such checkpoint")
    os.makedirs(out / ".tmp-checkpoint-4")  # an interrupted save is not a checkpoint
    fails(capsys, argv(base_dir, data_dir, out, "--resume_from_checkpoint", out / ".tmp-checkpoint-4"),
          "not a complete checkpoint")
    assert_no_training(out)


def test_latest_ignores_interrupted_saves_and_starts_fresh(capsys, caplog, base_dir, tmp_path, data_dir):
    out = tmp_path / "out"
    os.makedirs(out / ".tmp-checkpoint-7")
    (out / ".tmp-checkpoint-7" / "model.safetensors").write_bytes(b"half a file")
    assert main(argv(base_dir, data_dir, out, "--resume_from_checkpoint", "latest", "--checkpointing_steps", "2",
                     "--cache_text_embeddings")) == 0
    assert "No checkpoint in" in caplog.text
    names = os.listdir(out)
    assert "checkpoint-2" in names and ".tmp-checkpoint-7" not in names and "model_index.json" in names
    # resuming a checkpoint with different options is refused before any step
    fails(capsys, argv(base_dir, data_dir, out, "--resume_from_checkpoint", "latest", "--use_ema",
                       "--max_train_steps", "4"), "checkpoint-2 does not match this run")


def test_diverging_loss_stops_and_keeps_the_last_checkpoint(capsys, base_dir, tmp_path, data_dir):
    """Divergence is produced honestly: a learning rate of 1e30 makes the first AdamW step move every weight by
    ~1e30, and the next forward pass overflows to inf/nan."""
    out = tmp_path / "out"
    err = fails(capsys, argv(base_dir, data_dir, out, "--learning_rate", "1e30", "--max_train_steps", "6",
                             "--checkpointing_steps", "1", "--cache_text_embeddings"),
                "at step 2 (of 6)", "checkpoint-1", status=1)
    assert "the loss is nan" in err or "the loss is inf" in err
    assert sorted(n for n in os.listdir(out) if "checkpoint" in n) == ["checkpoint-1"]
    assert not os.path.exists(out / "model_index.json")
    from safetensors.torch import load_file

    weights = load_file(out / "checkpoint-1" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
