"""Skip-layer guidance (SD3.5): `skip_guidance_layers` and friends on MMDiTPipeline, as StableDiffusion3Pipeline."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from mmdit_diffusers.errors import InputError
from mmdit_diffusers.pipelines import MMDiTPipeline
from tiny_pipeline import save_tiny_sd3_pipeline

SLG = dict(skip_guidance_layers=[0], skip_layer_guidance_scale=2.0, skip_layer_guidance_start=0.1,
           skip_layer_guidance_stop=0.6)


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    folder = save_tiny_sd3_pipeline(tmp_path_factory.mktemp("tiny-sd3"), seed=4)
    pair = StableDiffusion3Pipeline.from_pretrained(folder), MMDiTPipeline.from_pretrained(folder)
    for pipe in pair:
        pipe.set_progress_bar_config(disable=True)
    return pair


def _images(pipe, **kwargs):
    return pipe(
        ["a red circle", "two blue squares"], num_images_per_prompt=2, num_inference_steps=6, guidance_scale=4.0,
        output_type="np", generator=torch.Generator().manual_seed(0), **kwargs,
    ).images


def test_same_images_as_stable_diffusion_3(pipelines):
    sd3, ours = pipelines
    expected = _images(sd3, **SLG)
    assert np.abs(_images(ours, **SLG) - expected).max() <= 1e-4
    assert np.abs(expected - _images(sd3)).max() > 1e-3  # skipping a block changes the images


def test_guidance_applies_between_start_and_stop(pipe):
    """One more transformer call (the positive half, blocks skipped) on steps i with start * n < i < stop * n."""
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((kwargs["hidden_states"].shape[0], kwargs.get("skip_layers"))),
        with_kwargs=True,
    )
    try:
        pipe("a red circle", num_inference_steps=10, guidance_scale=3.0, output_type="latent", **SLG)
    finally:
        handle.remove()
    skipped = [i for i, (_, layers) in enumerate(calls) if layers is not None]
    # steps 2..5 (1 < i < 6) each add a call right after their guided call
    assert len(calls) == 10 + 4
    assert [calls[i] for i in skipped] == [(1, [0])] * 4
    assert skipped == [3, 5, 7, 9]


def test_bad_layers_name_the_argument(pipe):
    with pytest.raises(InputError, match=r"`skip_guidance_layers` must be a list of block indices in \[0, 2\)"):
        pipe("a red circle", num_inference_steps=1, skip_guidance_layers=[2])
    with pytest.raises(InputError, match="`skip_layer_guidance_stop` must be a fraction"):
        pipe("a red circle", num_inference_steps=1, skip_guidance_layers=[0], skip_layer_guidance_stop=2)


def test_without_classifier_free_guidance_it_warns_and_does_nothing(pipe, caplog):
    run = dict(num_inference_steps=4, output_type="np")
    plain = pipe("a red circle", guidance_scale=1.0, generator=torch.Generator().manual_seed(0), **run).images
    with caplog.at_level(logging.WARNING, logger="mmdit_diffusers"):
        slg = pipe("a red circle", guidance_scale=1.0, generator=torch.Generator().manual_seed(0), **run, **SLG).images
    assert np.array_equal(plain, slg)
    assert any("no effect without classifier-free guidance" in r.getMessage() for r in caplog.records)


def test_img2img_and_inpainting_take_it_too(pipe):
    from PIL import Image

    from mmdit_diffusers import MMDiTImg2ImgPipeline, MMDiTInpaintPipeline

    picture, mask = Image.new("RGB", (16, 16), (200, 30, 30)), Image.new("L", (16, 16), 255)
    for cls, extra in ((MMDiTImg2ImgPipeline, {}), (MMDiTInpaintPipeline, {"mask_image": mask})):
        sibling = cls(**pipe.components)
        calls = []
        handle = sibling.transformer.register_forward_pre_hook(
            lambda module, args, kwargs: calls.append(kwargs.get("skip_layers")), with_kwargs=True
        )
        try:
            sibling("a red circle", image=picture, strength=1.0, num_inference_steps=10, guidance_scale=3.0,
                    output_type="latent", **extra, **SLG)
        finally:
            handle.remove()
        assert calls.count([0]) == 4 and len(calls) == 14, cls.__name__
