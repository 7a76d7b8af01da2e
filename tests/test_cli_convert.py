"""`mmdit-diffusers convert SRC DST [--to mmdit|sd3] [--dtype ...] [--overwrite]`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from diffusers import SD3Transformer2DModel

from mmdit_diffusers import MMDiTTransformer2DModel
from mmdit_diffusers.cli.convert import main

SD3_TINY = dict(
    sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=20, out_channels=4, pos_embed_max_size=8,
)  # fmt: skip
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture
def sd3() -> SD3Transformer2DModel:
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**SD3_TINY, qk_norm="rms_norm")
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.2)
    return model.eval()


@pytest.fixture
def sd3_dir(sd3, tmp_path):
    sd3.save_pretrained(tmp_path / "sd3")
    return tmp_path / "sd3"


def sample_inputs():
    g = torch.Generator().manual_seed(1)
    return dict(
        hidden_states=torch.randn(2, 4, 8, 6, generator=g),
        encoder_hidden_states=torch.randn(2, 5, 24, generator=g),
        pooled_projections=torch.randn(2, 20, generator=g),
        timestep=torch.tensor([100.0, 800.0]),
    )


def output(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**sample_inputs()).sample


def class_name(folder) -> str:
    return json.loads((folder / "config.json").read_text())["_class_name"]


def no_temporaries_left(parent) -> bool:
    return not [p for p in parent.iterdir() if p.name.startswith(".")]


# ----------------------------------------------------------------------------------------------------------
# Conversions
# ----------------------------------------------------------------------------------------------------------
def test_sd3_folder_to_mmdit(sd3, sd3_dir, tmp_path, capsys):
    dst = tmp_path / "mmdit"
    assert main([str(sd3_dir), str(dst)]) == 0
    assert (dst / WEIGHTS).is_file() and class_name(dst) == "MMDiTTransformer2DModel"
    mmdit = MMDiTTransformer2DModel.from_pretrained(dst)
    assert (output(mmdit) - output(sd3)).abs().max().item() <= 1e-4
    assert "MMDiTTransformer2DModel" in capsys.readouterr().out
    assert no_temporaries_left(tmp_path)


def test_mmdit_folder_back_to_sd3_is_exact(sd3, sd3_dir, tmp_path):
    assert main([str(sd3_dir), str(tmp_path / "mmdit")]) == 0
    assert main([str(tmp_path / "mmdit"), str(tmp_path / "back"), "--to", "sd3"]) == 0
    assert (tmp_path / "back" / WEIGHTS).is_file() and class_name(tmp_path / "back") == "SD3Transformer2DModel"
    back = SD3Transformer2DModel.from_pretrained(tmp_path / "back").state_dict()
    original = sd3.state_dict()
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)


def test_pipeline_folder_uses_its_transformer_subfolder(sd3, tmp_path):
    pipe = tmp_path / "pipe"
    sd3.save_pretrained(pipe / "transformer")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    assert main([str(pipe), str(tmp_path / "mmdit")]) == 0
    mmdit = MMDiTTransformer2DModel.from_pretrained(tmp_path / "mmdit")
    assert (output(mmdit) - output(sd3)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_casts_the_written_weights(sd3_dir, tmp_path, dtype):
    assert main([str(sd3_dir), str(tmp_path / "mmdit"), "--dtype", dtype]) == 0
    mmdit = MMDiTTransformer2DModel.from_pretrained(tmp_path / "mmdit", dtype=getattr(torch, dtype))
    from safetensors import safe_open

    with safe_open(tmp_path / "mmdit" / WEIGHTS, "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {getattr(torch, dtype)}
    assert {p.dtype for p in mmdit.parameters()} == {getattr(torch, dtype)}


def test_empty_existing_destination_is_used(sd3_dir, tmp_path):
    (tmp_path / "mmdit").mkdir()
    assert main([str(sd3_dir), str(tmp_path / "mmdit")]) == 0
    assert (tmp_path / "mmdit" / WEIGHTS).is_file()


def test_overwrite_replaces_a_non_empty_destination(sd3_dir, tmp_path):
    dst = tmp_path / "mmdit"
    dst.mkdir()
    (dst / "stale.txt").write_text("old")
    assert main([str(sd3_dir), str(dst), "--overwrite"]) == 0
    assert not (dst / "stale.txt").exists() and (dst / WEIGHTS).is_file()
    assert no_temporaries_left(tmp_path)


def test_missing_destination_parents_are_created(sd3_dir, tmp_path):
    assert main([str(sd3_dir), str(tmp_path / "a" / "b" / "mmdit")]) == 0
    assert (tmp_path / "a" / "b" / "mmdit" / WEIGHTS).is_file()


def test_failed_save_leaves_no_destination_and_no_temporaries(sd3_dir, tmp_path, monkeypatch):
    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(MMDiTTransformer2DModel, "save_pretrained", broken_save)
    dst = tmp_path / "mmdit"
    with pytest.raises(OSError, match="disk full"):
        main([str(sd3_dir), str(dst)])
    assert not dst.exists() and no_temporaries_left(tmp_path)


def test_failed_overwrite_keeps_the_old_destination(sd3_dir, tmp_path, monkeypatch):
    dst = tmp_path / "mmdit"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    monkeypatch.setattr(MMDiTTransformer2DModel, "save_pretrained", lambda self, *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main([str(sd3_dir), str(dst), "--overwrite"])
    assert (dst / "keep.txt").read_text() == "old" and no_temporaries_left(tmp_path)


# ----------------------------------------------------------------------------------------------------------
# Errors: a message on stderr, exit code 2, no traceback
# ----------------------------------------------------------------------------------------------------------
def assert_usage_error(argv, capsys, *fragments):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


def test_missing_source_folder(tmp_path, capsys):
    assert_usage_error([str(tmp_path / "nope"), str(tmp_path / "out")], capsys, "does not exist", "nope")
    assert not (tmp_path / "out").exists()


def test_source_that_is_a_file(tmp_path, capsys):
    (tmp_path / "file.safetensors").write_bytes(b"")
    assert_usage_error([str(tmp_path / "file.safetensors"), str(tmp_path / "out")], capsys, "is not a folder")


def test_folder_that_holds_no_model(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert_usage_error(
        [str(tmp_path / "empty"), str(tmp_path / "out")], capsys, "holds no SD3Transformer2DModel", "config.json"
    )


def test_folder_whose_config_is_not_json(tmp_path, capsys):
    (tmp_path / "broken" / "transformer").mkdir(parents=True)
    (tmp_path / "broken" / "transformer" / "config.json").write_text("{not json")
    assert_usage_error([str(tmp_path / "broken"), str(tmp_path / "out")], capsys, "holds no SD3Transformer2DModel",
                       str(tmp_path / "broken" / "transformer" / "config.json"))
    assert not (tmp_path / "out").exists()


def test_folder_that_holds_another_model_class(tmp_path, capsys):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    assert_usage_error([str(tmp_path / "unet"), str(tmp_path / "out")], capsys, "holds UNet2DConditionModel")


def test_wrong_direction_suggests_the_other_one(sd3_dir, tmp_path, capsys):
    assert_usage_error(
        [str(sd3_dir), str(tmp_path / "out"), "--to", "sd3"],
        capsys,
        "expected a MMDiTTransformer2DModel",
        "holds SD3Transformer2DModel",
        "--to mmdit",
    )


def test_non_empty_destination_without_overwrite(sd3_dir, tmp_path, capsys):
    dst = tmp_path / "mmdit"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert_usage_error([str(sd3_dir), str(dst)], capsys, "not empty", "--overwrite")
    assert (dst / "keep.txt").read_text() == "mine" and len(list(dst.iterdir())) == 1


def test_destination_that_is_a_file(sd3_dir, tmp_path, capsys):
    (tmp_path / "out").write_text("x")
    assert_usage_error([str(sd3_dir), str(tmp_path / "out"), "--overwrite"], capsys, "is not a folder")


def test_destination_that_is_the_source(sd3_dir, capsys):
    assert_usage_error([str(sd3_dir), str(sd3_dir), "--overwrite"], capsys, "would replace the source")
    assert (sd3_dir / WEIGHTS).is_file()


def test_model_that_sd3_cannot_express(tmp_path, capsys):
    MMDiTTransformer2DModel(
        img_dim=16, txt_dim=8, img_tokens=16, hidden_size=32, depth=1, num_heads=2, mlp_ratio=2
    ).save_pretrained(tmp_path / "mmdit")
    assert_usage_error([str(tmp_path / "mmdit"), str(tmp_path / "out"), "--to", "sd3"], capsys, "mlp_ratio")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [[], ["a"], ["a", "b", "--to", "flux"], ["a", "b", "--dtype", "int8"]])
def test_bad_arguments_exit_with_usage(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "usage: mmdit-diffusers convert" in err and "Traceback" not in err


def test_help_exits_zero(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: mmdit-diffusers convert" in out and "--to" in out and "--overwrite" in out


# ----------------------------------------------------------------------------------------------------------
# Through the console entry point, in a fresh interpreter (one run: importing torch + diffusers takes seconds)
# ----------------------------------------------------------------------------------------------------------
def test_module_entry_point_runs_convert(sd3, sd3_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "mmdit_diffusers.cli", "convert"]
    done = subprocess.run(
        [*command, str(sd3_dir), str(tmp_path / "mmdit")], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "Converted SD3Transformer2DModel" in done.stdout
    mmdit = MMDiTTransformer2DModel.from_pretrained(tmp_path / "mmdit")
    assert (output(mmdit) - output(sd3)).abs().max().item() <= 1e-4
