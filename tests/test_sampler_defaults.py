"""A pipeline folder carries the sampler settings it samples well with (`sampler_defaults` in model_index.json):
`MMDiTPipeline.__call__` uses them for the arguments its caller leaves out, explicit arguments win, they survive
`save_pretrained` and a Hub round trip, and a folder without them samples exactly as SD3's pipeline does."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from hub_fixtures import hub_repo_id, hub_server  # noqa: F401
from tiny_pipeline import tiny_mmdit_pipeline

from mmdit_diffusers import MMDiTPipeline
from mmdit_diffusers.cli import main as dispatch
from mmdit_diffusers.hub import from_pretrained, push_folder
from mmdit_diffusers.shapes.shipped import SHIPPED_PIPELINE

PROMPT = "a red circle"


def sample(pipe, **kwargs) -> np.ndarray:
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    pipe = tiny_mmdit_pipeline(seed=0, layout="sd3", masked=True)
    pipe.register_sampler_defaults(num_inference_steps=3, guidance_scale=1.5)
    path = tmp_path_factory.mktemp("defaults") / "pipeline"
    pipe.save_pretrained(path)
    return path


def test_stored_defaults_fill_the_arguments_left_out_and_explicit_ones_win(saved_dir):
    pipe = MMDiTPipeline.from_pretrained(saved_dir)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.sampler_defaults == {"num_inference_steps": 3, "guidance_scale": 1.5}
    assert np.array_equal(sample(pipe), sample(pipe, num_inference_steps=3, guidance_scale=1.5))
    assert np.array_equal(sample(pipe, num_inference_steps=2), sample(pipe, num_inference_steps=2, guidance_scale=1.5))
    assert not np.array_equal(sample(pipe), sample(pipe, num_inference_steps=3, guidance_scale=7.0))


def test_a_folder_without_defaults_samples_as_sd3_does(pipe):
    assert pipe.config.get("sampler_defaults") is None
    assert np.array_equal(sample(pipe), sample(pipe, num_inference_steps=28, guidance_scale=7.0))


def test_unknown_default_is_refused(pipe):
    with pytest.raises(ValueError, match=r"unknown keys \['steps'\]"):
        pipe.register_sampler_defaults(steps=3)


def test_stored_guidance_options_are_saved_loaded_and_used_and_explicit_ones_win(tmp_path):
    pipe = tiny_mmdit_pipeline(seed=0, layout="sd3", masked=True)
    pipe.set_progress_bar_config(disable=True)
    stored = {"num_inference_steps": 2, "guidance_scale": 4.0, "guidance_rescale": 0.7, "use_cfg_zero_star": True}
    pipe.register_sampler_defaults(**stored)
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["sampler_defaults"] == stored
    loaded = MMDiTPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.sampler_defaults == stored
    assert np.array_equal(sample(loaded), sample(loaded, **stored))
    assert loaded.guidance_rescale == 0.7
    plain = sample(loaded, guidance_rescale=0.0, use_cfg_zero_star=False)
    assert loaded.guidance_rescale == 0.0
    assert not np.allclose(sample(loaded), plain)
    assert not np.allclose(sample(loaded), sample(loaded, use_cfg_zero_star=False))
    assert not np.allclose(sample(loaded), sample(loaded, guidance_rescale=0.0))
    pipe.register_sampler_defaults()  # none stored: SD3's plain guidance
    assert np.array_equal(plain, sample(pipe, num_inference_steps=2, guidance_scale=4.0))


def test_defaults_survive_a_hub_round_trip(saved_dir, hub_repo_id, tmp_path):  # noqa: F811
    push_folder(saved_dir, hub_repo_id)
    pulled = from_pretrained(MMDiTPipeline, hub_repo_id, cache_dir=tmp_path / "cache")
    assert pulled.config.sampler_defaults == {"num_inference_steps": 3, "guidance_scale": 1.5}


def test_the_shipped_folder_called_plainly_draws_what_generate_draws(tmp_path):
    output = tmp_path / "generate.png"
    assert dispatch(["generate", PROMPT, "--seed", "0", "--output", str(output)]) == 0
    pipe = MMDiTPipeline.from_pretrained(SHIPPED_PIPELINE, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(PROMPT, generator=torch.Generator().manual_seed(0)).images[0]
    assert np.array_equal(np.asarray(Image.open(output)), np.asarray(image))
