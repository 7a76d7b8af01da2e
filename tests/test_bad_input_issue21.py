"""Issue 21, case by case: each bad input the issue found obscure, silent or crashing gets a clear `InputError`
(naming the argument, the value and what is expected, in pixels for images) before any work, or a documented
behaviour with a warning. The wider hostile sweep is tests/test_bad_input_sweep.py."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from tiny_pipeline import tiny_mmdit_pipeline, tiny_sd3_transformer, write_dataset

from mmdit_diffusers import MMDiTPipeline, MMDiTTransformer2DModel
from mmdit_diffusers.cli import main as cli
from mmdit_diffusers.errors import InputError
from mmdit_diffusers.shapes import shipped

READ_ONLY = "/proc/mmdit-diffusers-test"  # a place no process can create files in (as root too)
# img_tokens 16 -> a 4 x 4 patch grid, latents at most 8 x 8 (patch 2)
TINY = dict(img_dim=16, txt_dim=8, cond_dim=12, img_tokens=16, txt_tokens=10, hidden_size=32, depth=2, num_heads=2)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = MMDiTTransformer2DModel(**TINY).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.1)  # not zero-initialised: outputs depend on every input
    return model


def inputs(batch: int = 2, dtype=torch.float32) -> dict:
    generator = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=generator).to(dtype),
                encoder_hidden_states=torch.randn(batch, 5, 8, generator=generator).to(dtype),
                pooled_projections=torch.randn(batch, 12, generator=generator).to(dtype),
                timestep=torch.tensor([500.0, 250.0][:batch]))


def forward(model, **changes):
    with torch.no_grad():
        return model(**{**inputs(), **changes}).sample


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("issue21") / "pipeline"
    tiny_mmdit_pipeline(seed=0, layout="clip_t5").save_pretrained(folder)
    return str(folder)


def call(pipe, **kwargs):
    kwargs.setdefault("prompt", "a red circle")
    kwargs.setdefault("num_inference_steps", 1)
    kwargs.setdefault("output_type", "latent")
    return pipe(**kwargs)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, *argv, fragments=()) -> str:
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == "" and "Traceback" not in err, (code, out, err)
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


# ----------------------------------------------------------------------------------------------------------
# Obscure, now clear
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hidden_size, num_heads", [(33, 3), (34, 2)])
def test_width_the_sincos_table_cannot_split(hidden_size, num_heads):
    with pytest.raises(InputError, match=rf"`hidden_size`={hidden_size} must be a multiple of 4 for pos_embed_type"):
        MMDiTTransformer2DModel(**{**TINY, "hidden_size": hidden_size, "num_heads": num_heads})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_are_cast_into_a_float32_model(model, dtype):
    half = inputs(dtype=dtype)
    as_float = {k: (v.float() if k != "timestep" else v) for k, v in half.items()}
    assert torch.equal(forward(model, **half), forward(model, **as_float))


@pytest.mark.parametrize(
    "model_dtype, input_dtype, fragment",
    [(torch.bfloat16, torch.float32, "hidden_states.to(torch.bfloat16)"),
     (torch.float32, torch.float64, "hidden_states.to(torch.float32)"),
     (torch.float32, torch.int64, "must be floating point")],
)
def test_lossy_or_meaningless_dtypes_are_refused(model, model_dtype, input_dtype, fragment):
    target = MMDiTTransformer2DModel(**TINY).to(model_dtype) if model_dtype != torch.float32 else model
    given = {k: v.to(model_dtype) if k != "timestep" else v for k, v in inputs().items()}
    given["hidden_states"] = given["hidden_states"].to(input_dtype)
    with pytest.raises(InputError, match=r"`hidden_states` is torch\.") as error:
        forward(target, **given)
    assert fragment in str(error.value)


def test_timestep_as_text(model):
    with pytest.raises(InputError, match=r"`timestep` must be a number or a tensor of numbers .* got '500' \(str\)"):
        forward(model, timestep="500")


def test_pooled_projections_missing(model):
    with pytest.raises(InputError, match=r"`pooled_projections` is required: the pooled text \[B, cond_dim=12\]"):
        forward(model, pooled_projections=None)


def test_empty_latent(model):
    with pytest.raises(InputError, match=r"`hidden_states` height 0 is not a positive multiple of patch_size=2"):
        forward(model, hidden_states=torch.randn(2, 4, 0, 0))


def test_pipeline_height_beyond_the_model_in_pixels(pipe):
    with pytest.raises(InputError, match=r"`height`=72 px is larger than this model draws: at most 64 px"):
        call(pipe, height=72)


def test_cli_height_beyond_the_model_in_pixels(capsys, pipeline_dir, tmp_path):
    refused(capsys, "generate", "a red circle", "--model", pipeline_dir, "--height", "1024", "--output",
            tmp_path / "x.png", fragments=["`height`=1024 px", "at most 64 px"])
    assert not (tmp_path / "x.png").exists()


def test_whole_number_float_height_is_accepted(pipe):
    assert call(pipe, height=64.0, width=32.0).images.shape[-2:] == (32, 16)  # latents: px / vae_scale_factor 2
    with pytest.raises(InputError, match=r"`height`=64\.5 must be a whole number of pixels"):
        call(pipe, height=64.5)


@pytest.fixture(scope="module")
def embeds(pipe):
    return pipe.encode_prompt("a red circle", do_classifier_free_guidance=False)


def test_prompt_embeds_of_the_wrong_width(pipe, embeds):
    with pytest.raises(InputError, match=r"`prompt_embeds` has shape \(1, \d+, 10\); this transformer reads "
                                         r"\[B, L <= \d+, txt_dim=64\]"):
        call(pipe, prompt=None, prompt_embeds=embeds[0][..., :10], pooled_prompt_embeds=embeds[2])


def test_prompt_embeds_of_the_wrong_rank(pipe, embeds):
    with pytest.raises(InputError, match=r"`prompt_embeds` has shape \(\d+, 64\)"):
        call(pipe, prompt=None, prompt_embeds=embeds[0][0], pooled_prompt_embeds=embeds[2])


def test_generator_given_as_a_device_name(pipe):
    with pytest.raises(InputError, match=r"`generator` must be a torch\.Generator .* got 'cuda'"):
        call(pipe, generator="cuda")


@pytest.fixture(scope="module")
def transformer_dir(tmp_path_factory) -> Path:
    from tiny_pipeline import tiny_mmdit_transformer

    folder = tmp_path_factory.mktemp("transformer") / "mmdit"
    tiny_mmdit_transformer(0).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("damage, cause", [("truncate", "is truncated: its header describes"),
                                           ("random", "is not a complete safetensors file"),
                                           ("empty", "is empty (0 bytes)")])
def test_damaged_weights_file_is_named_with_its_cause(transformer_dir, tmp_path, damage, cause):
    folder = tmp_path / "damaged"
    shutil.copytree(transformer_dir, folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncate": data[: len(data) // 2], "random": os.urandom(4096), "empty": b""}[damage])
    with pytest.raises(InputError) as error:
        MMDiTTransformer2DModel.from_pretrained(folder)
    assert str(weights) in str(error.value) and cause in str(error.value)


def test_damaged_weights_in_a_pipeline_folder_name_the_component(pipeline_dir, tmp_path):
    folder = tmp_path / "pipeline"
    shutil.copytree(pipeline_dir, folder)
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(InputError, match=r"component `vae`'s weights file vae/diffusion_pytorch_model\.safetensors"):
        MMDiTPipeline.from_pretrained(folder)


@pytest.mark.parametrize("depth", [1, 3])
def test_depth_that_disagrees_with_the_weights(transformer_dir, tmp_path, depth):
    folder = tmp_path / "depth"
    shutil.copytree(transformer_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "depth": depth}))
    with pytest.raises(InputError, match=rf"the weights hold 2 blocks .* but config\.json says depth={depth}") as error:
        MMDiTTransformer2DModel.from_pretrained(folder)
    assert "low_cpu_mem_usage" not in str(error.value) and "Cannot load  " not in str(error.value)


def test_a_folder_of_another_pipeline_is_named_by_its_class(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 8),
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    with pytest.raises(InputError, match=r"it is a DDPMPipeline folder \(components: scheduler, unet\), not an SD3 "):
        MMDiTPipeline.from_pretrained(tmp_path / "ddpm")


def test_from_pretrained_of_an_sd3_transformer_points_to_from_sd3(tmp_path):
    tiny_sd3_transformer(0).save_pretrained(tmp_path / "sd3")
    with pytest.raises(InputError, match=r"holds a diffusers SD3Transformer2DModel.*MMDiTTransformer2DModel\.from_sd3"):
        MMDiTTransformer2DModel.from_pretrained(tmp_path / "sd3")


def test_from_sd3_of_our_folder_points_to_from_pretrained(transformer_dir):
    with pytest.raises(InputError, match=r"already holds an MMDiTTransformer2DModel; load it with "
                                         r"MMDiTTransformer2DModel\.from_pretrained"):
        MMDiTTransformer2DModel.from_sd3(transformer_dir)


def test_from_sd3_of_a_missing_local_path_does_not_ask_the_hub(tmp_path):
    with pytest.raises(InputError, match=r"is no folder \(and not a Hub repo id"):
        MMDiTTransformer2DModel.from_sd3(tmp_path / "missing")


def test_seed_beyond_the_generator(capsys):
    refused(capsys, "generate", "a cat", "--seed", "99999999999999999999999",
            fragments=["argument --seed: a seed must be an integer from 0 to 2**63 - 1"])


def test_generate_into_a_read_only_place_is_refused_before_loading(capsys, monkeypatch):
    monkeypatch.setattr(shipped, "load_pipeline", lambda *a, **k: pytest.fail("the pipeline was loaded"))
    refused(capsys, "generate", "a cat", "--output", f"{READ_ONLY}/x.png",
            fragments=[f"--output {READ_ONLY}/x.png", "is not writable"])


def test_train_into_a_read_only_place_is_one_line(capsys, tmp_path):
    err = refused(capsys, "train", "--pretrained_model_name_or_path", tmp_path, "--train_data_dir", tmp_path,
                  "--output_dir", f"{READ_ONLY}/out", fragments=[f"--output_dir {READ_ONLY}/out", "is not writable"])
    assert err.count("\n") == 1


@pytest.mark.usefixtures("fresh_accelerate")
def test_resuming_a_truncated_checkpoint_says_it_is_damaged(capsys, tmp_path):
    base = tmp_path / "base"
    tiny_mmdit_pipeline(seed=0, layout="clip_t5").save_pretrained(base)
    data, out = write_dataset(tmp_path / "data", n=2, solid=True), tmp_path / "out"
    argv = ["train", "--pretrained_model_name_or_path", base, "--train_data_dir", data, "--output_dir", out,
            "--resolution", "16", "--train_batch_size", "2", "--max_sequence_length", "8", "--seed", "0",
            "--report_to", "none", "--checkpointing_steps", "1", "--cache_text_embeddings"]
    assert run_cli(capsys, *argv, "--max_train_steps", "1")[0] == 0
    weights = out / "checkpoint-1" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    refused(capsys, *argv, "--max_train_steps", "2", "--resume_from_checkpoint", "latest",
            fragments=["checkpoint-1 is damaged: model.safetensors is truncated"])


def test_evaluate_checks_its_outputs_first_and_writes_the_json_before_the_grid(capsys, monkeypatch, pipeline_dir,
                                                                              tmp_path):
    refused(capsys, "evaluate", "--grid", tmp_path / "grid.jpg", fragments=["--grid", "expected a .png"])
    refused(capsys, "evaluate", "--grid", f"{READ_ONLY}/grid.png", "--json", tmp_path / "s.json",
            fragments=["--grid", "is not writable"])
    from mmdit_diffusers.shapes import evaluation

    def broken_grid(*args, **kwargs):
        raise RuntimeError("the picture failed")

    monkeypatch.setattr(evaluation, "captioned_grid", broken_grid)
    scores = tmp_path / "scores.json"
    with pytest.raises(RuntimeError, match="the picture failed"):
        cli(["evaluate", "--model", pipeline_dir, "--limit", "2", "--steps", "1", "--json", str(scores), "--grid",
             str(tmp_path / "grid.png")])
    assert json.loads(scores.read_text())["prompts"] == 2  # the scores survive a failing picture


# ----------------------------------------------------------------------------------------------------------
# Silent, now refused or warned
# ----------------------------------------------------------------------------------------------------------
def test_sample_size_the_position_grid_cannot_run():
    with pytest.raises(InputError, match=r"`sample_size`=16 latent pixels exceeds the position grid of 4 patches"):
        MMDiTTransformer2DModel(**TINY, sample_size=16)


def test_mlp_ratio_that_leaves_no_mlp():
    with pytest.raises(InputError, match=r"`mlp_ratio`=0\.01 gives MLPs of width .* = 0"):
        MMDiTTransformer2DModel(**TINY, mlp_ratio=0.01)


@pytest.mark.parametrize("dropped", [-1e4, float("-inf"), torch.finfo(torch.float32).min])
def test_additive_masks_mean_what_they_say(model, dropped):
    binary = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    additive = torch.where(binary.bool(), 0.0, dropped)
    assert torch.equal(forward(model, encoder_attention_mask=additive), forward(model, encoder_attention_mask=binary))
    assert torch.equal(forward(model, encoder_attention_mask=torch.zeros(2, 5)), forward(model))  # nothing dropped
    with pytest.raises(InputError, match=r"holds -5\.0; expected 1/0 .* or an additive mask"):
        forward(model, encoder_attention_mask=torch.where(binary.bool(), 0.0, -5.0))


@pytest.mark.parametrize("name", ["hidden_states", "timestep"])
def test_nan_inputs_are_warned_about(model, name):
    value = inputs()[name].clone()
    value.view(-1)[0] = float("nan")
    with pytest.warns(RuntimeWarning, match=rf"`{name}` holds NaN or infinite values"):
        forward(model, **{name: value})


def test_a_nan_that_does_not_reach_the_output_is_not_warned_about(model):
    """The check reads the output first (one sum): NaN text in positions every prompt's mask drops (shared padding,
    dropped before the blocks) leaves the output finite, and the forward is quiet; the same NaN kept is named."""
    text = inputs()["encoder_hidden_states"].clone()
    text[:, -2:] = float("nan")
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = forward(model, encoder_hidden_states=text, encoder_attention_mask=mask)
    assert torch.isfinite(out).all()
    with pytest.warns(RuntimeWarning, match=r"`encoder_hidden_states` holds NaN or infinite values"):
        forward(model, encoder_hidden_states=text)


@pytest.mark.parametrize("guidance", [-1.0, float("nan"), float("inf")])
def test_guidance_scale_that_is_no_guidance(pipe, guidance):
    with pytest.raises(InputError, match=r"`guidance_scale`=.* must be a finite number >= 0"):
        call(pipe, guidance_scale=guidance)


def test_guidance_scale_zero_warns_that_guidance_is_off(pipe, caplog):
    with caplog.at_level(logging.WARNING, logger="mmdit_diffusers"):
        call(pipe, guidance_scale=0)
    assert "`guidance_scale`=0 is below 1: classifier-free guidance is off" in caplog.text


@pytest.mark.parametrize("value", ["-1", "nan"])
def test_cli_guidance_scale_that_is_no_guidance(capsys, value):
    refused(capsys, "generate", "a cat", "--guidance_scale", value, fragments=["argument --guidance_scale"])


def test_height_zero_is_not_the_default(pipe):
    with pytest.raises(InputError, match=r"`height`=0 px must be a positive multiple"):
        call(pipe, height=0)


def test_sigmas_that_disagree_with_the_steps(pipe):
    with pytest.raises(InputError, match=r"`sigmas` has 2 values but `num_inference_steps`=4"):
        call(pipe, sigmas=[1.0, 0.5], num_inference_steps=4)


def test_negative_prompt_without_guidance_is_warned_about(pipe, caplog):
    with caplog.at_level(logging.WARNING, logger="mmdit_diffusers"):
        call(pipe, negative_prompt="a blue square", guidance_scale=1.0)
    assert "The negative prompt is not used: `guidance_scale`=1.0 <= 1" in caplog.text


def test_unknown_words_are_warned_about(pipe, caplog):
    with caplog.at_level(logging.WARNING, logger="mmdit_diffusers"):
        call(pipe, prompt="a red zebra")
    assert "`tokenizer_3` does not know 1 word(s) of the prompt: 'zebra'" in caplog.text


def test_the_shipped_tokenizers_do_not_know_a_photo_of_a_cat():
    from transformers import CLIPTokenizer, T5TokenizerFast

    from mmdit_diffusers.pipelines import call_checks

    clip = CLIPTokenizer.from_pretrained(shipped.SHIPPED_PIPELINE / "tokenizer")
    t5 = T5TokenizerFast.from_pretrained(shipped.SHIPPED_PIPELINE / "tokenizer_3")
    for tokenizer in (clip, t5):
        assert call_checks.unknown_words(tokenizer, ["a photo of a cat"]) == ["photo", "cat"]
        assert call_checks.unknown_words(tokenizer, ["a red circle left of a blue square"]) == []


def test_empty_captions_are_warned_about(tmp_path, caplog):
    from mmdit_diffusers.training.data import load_image_folder

    folder = Path(write_dataset(tmp_path / "data", n=3, solid=True))
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    rows[1]["text"] = "  "
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with caplog.at_level(logging.WARNING, logger="mmdit_diffusers"):
        load_image_folder(folder)
    assert "1 of 3 captions are empty" in caplog.text and "entry 2 (0001.png)" in caplog.text


def test_generate_does_not_overwrite_an_existing_output(capsys, pipeline_dir, tmp_path):
    target = tmp_path / "existing.png"
    target.write_bytes(b"precious")
    refused(capsys, "generate", "a red circle", "--model", pipeline_dir, "--output", target,
            fragments=["exists; pass --overwrite"])
    assert target.read_bytes() == b"precious"
    assert run_cli(capsys, "generate", "a red circle", "--model", pipeline_dir, "--steps", "1", "--output", target,
                   "--overwrite")[0] == 0
    assert target.read_bytes()[:4] == b"\x89PNG"


def test_prompt_file_names_never_collide(capsys, pipeline_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    written = []
    for prompt in ("a red circle", "A Red Circle!", "一只红色的圆", "красный круг", "一只红色的圆"):
        code, out, _ = run_cli(capsys, "generate", prompt, "--model", pipeline_dir, "--steps", "1")
        assert code == 0
        written.append(out.strip())
    assert written == ["outputs/a-red-circle.png", "outputs/a-red-circle-2.png", "outputs/一只红色的圆.png",
                       "outputs/красный-круг.png", "outputs/一只红色的圆-2.png"]
    assert all(Path(p).is_file() for p in written)


def test_evaluate_does_not_overwrite_its_json(capsys, tmp_path):
    scores = tmp_path / "scores.json"
    scores.write_text("{}")
    refused(capsys, "evaluate", "--json", scores, "--grid", tmp_path / "grid.png",
            fragments=[f"--json {scores}: exists; pass --overwrite"])
    assert scores.read_text() == "{}"


# ----------------------------------------------------------------------------------------------------------
# Crash, now refused before allocating
# ----------------------------------------------------------------------------------------------------------
def test_steps_whose_memory_does_not_fit_are_refused_before_allocating(pipe, monkeypatch):
    from mmdit_diffusers.pipelines import call_checks

    set_timesteps = pipe.scheduler.set_timesteps
    monkeypatch.setattr(pipe.scheduler, "set_timesteps", lambda *a, **k: pytest.fail("the scheduler allocated"))
    monkeypatch.setattr(call_checks, "available_memory", lambda device: 16 * 2**30)  # the machine
    with pytest.raises(InputError, match=r"needs at least 59\.6 GiB of memory, more than the 16\.0 GiB available; "
                                         r"the sampler's steps alone .* \(num_inference_steps=100000000\)"):
        call(pipe, num_inference_steps=100_000_000)
    monkeypatch.setattr(pipe.scheduler, "set_timesteps", set_timesteps)
    assert call(pipe, num_inference_steps=2).images.shape[0] == 1  # a request that fits still runs


def test_cli_steps_beyond_any_machine(capsys, pipeline_dir, tmp_path):
    refused(capsys, "generate", "a red circle", "--model", pipeline_dir, "--steps", str(10**13), "--output",
            tmp_path / "x.png", fragments=["error: This call needs at least", "num_inference_steps=10000000000000"])


# ----------------------------------------------------------------------------------------------------------
# Fast answers
# ----------------------------------------------------------------------------------------------------------
BAD_ARGUMENT_EXITS = [
    ["generate", "a cat", "--output", "x.jpg"],
    ["generate", "a cat", "--seed", "-1"],
    ["generate", "a cat", "--guidance_scale", "nan"],
    ["generate", "a cat", "--output", f"{READ_ONLY}/x.png"],
    ["train", "--learning_rate", "-1"],
    ["train", "--pretrained_model_name_or_path", "p", "--train_data_dir", "d", "--output_dir", f"{READ_ONLY}/o"],
    ["evaluate", "--grid", "x.jpg"],
    ["convert", "/no/such/folder", "out"],
    ["dataset", f"{READ_ONLY}/data"],
    ["vae", "--train_data_dir", "/no/such/folder", "--output_dir", "o"],
]


def test_bad_argument_exits_do_not_import_torch(tmp_path):
    """Every case in one fresh interpreter: exit status 2, and torch never imported."""
    code = ("import sys; from mmdit_diffusers.cli import main\n"
            f"for argv in {BAD_ARGUMENT_EXITS!r}:\n"
            "    assert main(argv) == 2, argv\n"
            "    assert 'torch' not in sys.modules, argv\n"
            "print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    assert done.stderr.count("error: ") == len(BAD_ARGUMENT_EXITS) and "Traceback" not in done.stderr
