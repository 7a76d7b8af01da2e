"""MMDiTImg2ImgPipeline and MMDiTInpaintPipeline give the images of diffusers' StableDiffusion3Img2ImgPipeline and
StableDiffusion3InpaintPipeline on the same tiny SD3 folders; they load like MMDiTPipeline and keep its settings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusion3InpaintPipeline
from PIL import Image, ImageDraw

from mmdit_diffusers import MMDiTImg2ImgPipeline, MMDiTInpaintPipeline, MMDiTPipeline, MMDiTTransformer2DModel
from mmdit_diffusers.errors import InputError
from mmdit_diffusers.pipelines.latents import encode_images
from tiny_pipeline import save_tiny_sd3_pipeline, tiny_sd3_components, tiny_sd3_transformer

PROMPTS = ["a red circle", "two blue squares"]
SIZE = 16  # the tiny folders' default image side


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _picture(seed=0, size=SIZE) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _mask(size=SIZE) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle([size // 2, 2, size - 3, size - 5], fill=255)
    return mask


def _run(pipe, generator=None, **kwargs):
    generator = generator or torch.Generator().manual_seed(0)
    return pipe(PROMPTS, num_images_per_prompt=2, guidance_scale=4.0, generator=generator, **kwargs).images


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    return save_tiny_sd3_pipeline(tmp_path_factory.mktemp("tiny-sd3"), seed=5)


@pytest.fixture(scope="module")
def inpaint_dirs(tmp_path_factory):
    """SD3's inpainting pipeline takes 16 latent channels only; a VAE with and one without a shift factor."""
    return {
        shift: save_tiny_sd3_pipeline(tmp_path_factory.mktemp(f"tiny-sd3-16ch-{shift}"), seed=6, latent_channels=16,
                                      shift_factor=shift)
        for shift in (0.0, 0.0609)
    }


# ---------------------------------------------------------------------------------------------------------------
# img2img
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("generators", [False, True], ids=["one-generator", "generator-per-image"])
def test_img2img_same_images_as_sd3(sd3_dir, generators):
    sd3 = _quiet(StableDiffusion3Img2ImgPipeline.from_pretrained(sd3_dir))
    ours = _quiet(MMDiTImg2ImgPipeline.from_pretrained(sd3_dir))
    # SD3 encodes image i with generator i, so it needs one image per generator
    images = [_picture(i) for i in range(4)] if generators else _picture(0)

    def run(pipe):
        generator = [torch.Generator().manual_seed(i) for i in range(4)] if generators else None
        return _run(pipe, generator, image=images, strength=0.6, num_inference_steps=5, output_type="np")

    expected, got = run(sd3), run(ours)
    assert got.shape == expected.shape == (4, SIZE, SIZE, 3)
    assert np.abs(got - expected).max() <= 1e-4
    assert sd3.num_timesteps == ours.num_timesteps == 3  # 5 steps at strength 0.6: the last 3 run


def test_img2img_depends_on_the_image_and_on_strength(sd3_dir):
    pipe = _quiet(MMDiTImg2ImgPipeline.from_pretrained(sd3_dir))
    run = dict(num_inference_steps=4, output_type="np")
    a = _run(pipe, image=_picture(0), strength=0.5, **run)
    b = _run(pipe, image=_picture(1), strength=0.5, **run)
    c = _run(pipe, image=_picture(0), strength=1.0, **run)
    assert np.abs(a - b).max() > 1e-2 and np.abs(a - c).max() > 1e-2


# ---------------------------------------------------------------------------------------------------------------
# inpaint
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_inpaint_same_images_as_sd3(inpaint_dirs, strength):
    folder = inpaint_dirs[0.0]
    sd3 = _quiet(StableDiffusion3InpaintPipeline.from_pretrained(folder))
    ours = _quiet(MMDiTInpaintPipeline.from_pretrained(folder))
    run = dict(image=_picture(2), mask_image=_mask(), strength=strength, num_inference_steps=4, output_type="np")
    expected, got = _run(sd3, **run), _run(ours, **run)
    assert got.shape == expected.shape == (4, SIZE, SIZE, 3)
    assert np.abs(got - expected).max() <= 1e-4
    assert sd3.num_timesteps == ours.num_timesteps


def test_inpaint_same_latents_as_sd3_with_a_shifted_vae(inpaint_dirs):
    """SD3's inpainting pipeline decodes without the VAE's shift factor (its other pipelines and ours add it): the
    sampled latents agree; the decoded images differ by that shift only."""
    folder = inpaint_dirs[0.0609]
    sd3 = _quiet(StableDiffusion3InpaintPipeline.from_pretrained(folder))
    ours = _quiet(MMDiTInpaintPipeline.from_pretrained(folder))
    run = dict(image=_picture(2), mask_image=_mask(), strength=0.8, num_inference_steps=4, output_type="latent")
    expected, got = _run(sd3, **run), _run(ours, **run)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    decoded_as_sd3 = sd3.vae.decode(expected / sd3.vae.config.scaling_factor).sample
    decoded_as_ours = ours.vae.decode(got / ours.vae.config.scaling_factor + ours.vae.config.shift_factor).sample
    assert torch.allclose(ours.decode_latents(got, "pt") * 2 - 1, decoded_as_ours.clamp(-1, 1), atol=1e-5)
    assert (decoded_as_sd3 - decoded_as_ours).abs().max() > 1e-3


def test_inpaint_with_padding_mask_crop_as_sd3(inpaint_dirs):
    folder = inpaint_dirs[0.0]
    sd3 = _quiet(StableDiffusion3InpaintPipeline.from_pretrained(folder))
    ours = _quiet(MMDiTInpaintPipeline.from_pretrained(folder))
    picture, mask = _picture(3, size=32), _mask(size=32)
    run = dict(image=picture, mask_image=mask, padding_mask_crop=2, strength=1.0, num_inference_steps=3)
    expected, got = _run(sd3, **run), _run(ours, **run)
    assert [im.size for im in got] == [im.size for im in expected] == [(32, 32)] * 4
    diff = max(np.abs(np.asarray(g, dtype=int) - np.asarray(e, dtype=int)).max() for g, e in zip(got, expected))
    assert diff <= 1  # uint8 pixels: at most one rounding step apart


def test_inpaint_with_an_inpainting_transformer_as_sd3():
    """A transformer trained for inpainting reads the mask and the masked image's latents as input channels."""
    components = tiny_sd3_components(seed=7, latent_channels=16, shift_factor=0.0)
    components["transformer"] = tiny_sd3_transformer(seed=7, latent_channels=16, in_channels=33)
    sd3 = _quiet(StableDiffusion3InpaintPipeline(**components, image_encoder=None, feature_extractor=None))
    transformer = MMDiTTransformer2DModel.from_sd3(components["transformer"])
    ours = _quiet(MMDiTInpaintPipeline(**{**components, "transformer": transformer}))
    for strength in (1.0, 0.7):
        run = dict(image=_picture(5), mask_image=_mask(), strength=strength, num_inference_steps=3, output_type="np")
        expected, got = _run(sd3, **run), _run(ours, **run)
        assert np.abs(got - expected).max() <= 1e-4


def test_inpaint_keeps_the_image_outside_the_mask(inpaint_dirs):
    pipe = _quiet(MMDiTInpaintPipeline.from_pretrained(inpaint_dirs[0.0]))
    picture, mask = _picture(4), _mask()
    latents = pipe("a red circle", image=picture, mask_image=mask, strength=1.0, num_inference_steps=3,
                   generator=torch.Generator().manual_seed(0), output_type="latent").images
    # the image's latents: the generator's first draw, as the pipeline makes it
    image = pipe.image_processor.preprocess(picture, height=SIZE, width=SIZE)
    known = encode_images(image, pipe.vae, torch.Generator().manual_seed(0))
    keep = torch.nn.functional.interpolate(pipe.mask_processor.preprocess(mask, height=SIZE, width=SIZE), size=(8, 8)) < 0.5
    keep = keep.expand_as(latents)
    assert torch.equal(latents[keep], known[keep])
    assert (latents[~keep] - known[~keep]).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------------------------
# loading, settings, errors
# ---------------------------------------------------------------------------------------------------------------
def test_from_pipe_shares_the_components_and_gives_the_same_images(sd3_dir):
    text_to_image = _quiet(MMDiTPipeline.from_pretrained(sd3_dir))
    img2img = _quiet(MMDiTImg2ImgPipeline.from_pipe(text_to_image))
    inpaint = _quiet(MMDiTInpaintPipeline.from_pipe(img2img))
    assert img2img.transformer is text_to_image.transformer and inpaint.vae is text_to_image.vae
    run = dict(image=_picture(0), strength=0.7, num_inference_steps=3, output_type="np")
    loaded = _quiet(MMDiTImg2ImgPipeline.from_pretrained(sd3_dir))
    assert np.array_equal(_run(img2img, **run), _run(loaded, **run))


def test_saved_folders_load_as_any_mmdit_pipeline(tmp_path):
    from tiny_pipeline import tiny_mmdit_pipeline

    inpaint = MMDiTInpaintPipeline(**tiny_mmdit_pipeline(seed=1, layout="clip_t5").components)
    inpaint.save_pretrained(tmp_path)
    assert json.load(open(tmp_path / "model_index.json"))["_class_name"] == "MMDiTInpaintPipeline"
    assert "MMDiTInpaintPipeline" in (tmp_path / "pipeline.py").read_text()
    assert type(MMDiTImg2ImgPipeline.from_pretrained(tmp_path)) is MMDiTImg2ImgPipeline
    assert type(MMDiTPipeline.from_pretrained(tmp_path)) is MMDiTPipeline


def test_the_folders_sampler_defaults_apply(tmp_path):
    from tiny_pipeline import tiny_mmdit_pipeline

    pipe = tiny_mmdit_pipeline(seed=1)
    pipe.register_sampler_defaults(num_inference_steps=6, guidance_scale=1.0)
    pipe.save_pretrained(tmp_path)
    for cls, extra in ((MMDiTImg2ImgPipeline, {}), (MMDiTInpaintPipeline, {"mask_image": _mask()})):
        loaded = _quiet(cls.from_pretrained(tmp_path))
        loaded("a red circle", image=_picture(0), strength=1.0, output_type="latent", **extra)
        assert loaded.num_timesteps == 6 and loaded.guidance_scale == 1.0
    bare = _quiet(MMDiTImg2ImgPipeline(**pipe.components))  # no stored defaults: SD3 img2img's 50 steps, 7.0
    bare("a red circle", image=_picture(0), strength=0.1, output_type="latent")
    assert bare.num_timesteps == 5 and bare.guidance_scale == 7.0


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (MMDiTImg2ImgPipeline, {}, "`image` is required"),
        (MMDiTImg2ImgPipeline, {"image": "picture", "strength": 1.5}, r"`strength` must be a number in \[0, 1\]"),
        (MMDiTImg2ImgPipeline, {"image": "picture", "strength": 0.0, "num_inference_steps": 4}, "keeps none of the 4"),
        (MMDiTInpaintPipeline, {"image": "picture"}, "`mask_image` is required"),
        (MMDiTInpaintPipeline, {"image": "picture", "mask_image": "mask", "padding_mask_crop": 4, "output_type": "np"},
         "`padding_mask_crop` pastes"),
    ],
)
def test_bad_inputs_name_the_argument(pipe, cls, kwargs, message):
    images = {"picture": _picture(0), "mask": _mask()}
    kwargs = {k: images.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(InputError, match=message):
        cls(**pipe.components)("a red circle", **{"num_inference_steps": 2, **kwargs})
