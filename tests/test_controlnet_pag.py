"""Our transformer inside diffusers' SD3 ControlNet and PAG pipelines gives the images of SD3's own transformer.

Each case builds one of diffusers' pipelines (`StableDiffusion3ControlNetPipeline`,
`StableDiffusion3ControlNetInpaintingPipeline`, `StableDiffusion3PAGPipeline`, `StableDiffusion3PAGImg2ImgPipeline`)
twice from the same tiny random components: once with the `SD3Transformer2DModel`, once with the
`MMDiTTransformer2DModel` converted from it (`from_sd3`). The ControlNets are tiny random `SD3ControlNetModel`s
(their zero-initialised output blocks randomised too, so that the control residuals are not zeros), and each case
also checks that the extension changes the image, so that equality is not the trivial one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    SD3ControlNetModel,
    StableDiffusion3ControlNetInpaintingPipeline,
    StableDiffusion3ControlNetPipeline,
    StableDiffusion3PAGImg2ImgPipeline,
    StableDiffusion3PAGPipeline,
)
from diffusers.models import SD3MultiControlNetModel
from PIL import Image

from mmdit_diffusers import InputError, MMDiTControlNetPipeline, MMDiTTransformer2DModel
from tiny_pipeline import (
    CLIP_DIM,
    LATENT_CHANNELS,
    SAMPLE_SIZE,
    T5_DIM,
    _randomize,
    _seeded,
    tiny_mmdit_pipeline,
    tiny_sd3_components,
)

PROMPT = "a red circle left of a blue square"
SIZE = SAMPLE_SIZE * 2  # pixels: the tiny VAE halves the side


def tiny_controlnet(seed: int, extra_conditioning_channels: int = 0, num_layers: int = 1) -> SD3ControlNetModel:
    """A tiny random SD3 ControlNet for the tiny SD3 transformer (same widths and positions)."""
    with _seeded(seed):
        controlnet = SD3ControlNetModel(
            sample_size=SAMPLE_SIZE,
            patch_size=2,
            in_channels=LATENT_CHANNELS,
            num_layers=num_layers,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=T5_DIM,
            caption_projection_dim=32,
            pooled_projection_dim=2 * CLIP_DIM,
            out_channels=LATENT_CHANNELS,
            pos_embed_max_size=16,
            extra_conditioning_channels=extra_conditioning_channels,
        )
        return _randomize(controlnet, 0.05)


def picture(seed: int, channels: int = 3) -> Image.Image:
    rng = np.random.RandomState(seed)
    pixels = (rng.rand(SIZE, SIZE, channels) * 255).astype("uint8")
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels)


@pytest.fixture(scope="module")
def components():
    """The tiny SD3 components; the image encoder slots of the ControlNet pipelines empty."""
    return tiny_sd3_components(seed=0)


@pytest.fixture(scope="module")
def transformers(components):
    sd3 = components["transformer"]
    return {"sd3": sd3, "ours": MMDiTTransformer2DModel.from_sd3(sd3).eval()}


def _images(pipe, **kwargs) -> np.ndarray:
    """One call with fixed seeds; the global RNG too (the ControlNet pipelines sample the control image's latents
    with it), restored afterwards."""
    pipe.set_progress_bar_config(disable=True)
    arguments = dict(prompt=PROMPT, num_inference_steps=3, guidance_scale=5.0, height=SIZE, width=SIZE,
                     output_type="np")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return pipe(**{**arguments, **kwargs}, generator=torch.Generator().manual_seed(0)).images


def _both(transformers, build, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """(images with SD3's transformer, images with ours) of the pipeline `build(transformer)`."""
    return tuple(_images(build(transformers[name]), **kwargs) for name in ("sd3", "ours"))


def _assert_same(expected: np.ndarray, got: np.ndarray) -> None:
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-4


# ---------------------------------------------------------------------------------------------------------------
# ControlNet
# ---------------------------------------------------------------------------------------------------------------
def _controlnet_pipeline(components, controlnet):
    def build(transformer):
        return StableDiffusion3ControlNetPipeline(**{**components, "transformer": transformer}, controlnet=controlnet)

    return build


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0], ids=["no-cfg", "cfg"])
def test_controlnet_pipeline_same_images(components, transformers, guidance_scale):
    build = _controlnet_pipeline(components, tiny_controlnet(seed=10, num_layers=2))
    call = dict(control_image=picture(1), controlnet_conditioning_scale=0.9, guidance_scale=guidance_scale)
    expected, got = _both(transformers, build, **call)
    _assert_same(expected, got)
    uncontrolled = _images(build(transformers["ours"]), **{**call, "controlnet_conditioning_scale": 0.0})
    assert np.abs(got - uncontrolled).max() > 1e-3  # the control residuals reach the image


def test_multi_controlnet_same_images(components, transformers):
    """Two ControlNets, their residuals summed (diffusers' SD3MultiControlNetModel), one stopping halfway."""
    multi = SD3MultiControlNetModel([tiny_controlnet(seed=11), tiny_controlnet(seed=12)])
    build = _controlnet_pipeline(components, multi)
    expected, got = _both(transformers, build, control_image=[picture(1), picture(2)],
                          controlnet_conditioning_scale=[1.0, 0.5], control_guidance_end=[1.0, 0.5])
    _assert_same(expected, got)


def test_controlnet_inpainting_pipeline_same_images(components, transformers):
    controlnet = tiny_controlnet(seed=13, extra_conditioning_channels=1)

    def build(transformer):
        return StableDiffusion3ControlNetInpaintingPipeline(
            **{**components, "transformer": transformer}, controlnet=controlnet
        )

    call = dict(control_image=picture(3), control_mask=picture(4, channels=1), controlnet_conditioning_scale=0.95)
    expected, got = _both(transformers, build, **call)
    _assert_same(expected, got)
    uncontrolled = _images(build(transformers["ours"]), **{**call, "controlnet_conditioning_scale": 0.0})
    assert np.abs(got - uncontrolled).max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# MMDiTControlNetPipeline
# ---------------------------------------------------------------------------------------------------------------
def _ours_and_sd3(components, transformers, controlnet):
    """(StableDiffusion3ControlNetPipeline with SD3's transformer, MMDiTControlNetPipeline with ours)."""
    reference = StableDiffusion3ControlNetPipeline(**components, controlnet=controlnet)
    ours = MMDiTControlNetPipeline(**{**components, "transformer": transformers["ours"]}, controlnet=controlnet)
    return reference, ours


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0], ids=["no-cfg", "cfg"])
def test_mmdit_controlnet_pipeline_as_stable_diffusion_3(components, transformers, guidance_scale):
    reference, ours = _ours_and_sd3(components, transformers, tiny_controlnet(seed=14, num_layers=2))
    call = dict(prompt=[PROMPT, "a cat"], num_images_per_prompt=2, control_image=picture(6),
                controlnet_conditioning_scale=0.8, control_guidance_end=0.7, guidance_scale=guidance_scale)
    expected, got = _images(reference, **call), _images(ours, **call)
    _assert_same(expected, got)
    assert np.abs(got - _images(ours, **{**call, "controlnet_conditioning_scale": 0.0})).max() > 1e-3


def test_mmdit_multi_controlnet_pipeline_as_stable_diffusion_3(components, transformers):
    controlnets = [tiny_controlnet(seed=15), tiny_controlnet(seed=16)]
    reference, ours = _ours_and_sd3(components, transformers, SD3MultiControlNetModel(controlnets))
    call = dict(control_image=[picture(1), picture(2)], controlnet_conditioning_scale=[1.0, 0.5],
                control_guidance_start=[0.0, 0.3])
    _assert_same(_images(reference, **call), _images(ours, **call))
    assert isinstance(MMDiTControlNetPipeline(**{**components, "transformer": transformers["ours"]},
                                              controlnet=controlnets).controlnet, SD3MultiControlNetModel)


def test_sd35_controlnet_borrows_our_patch_embedding(components, transformers):
    """SD3.5's ControlNets have no patch embedding of their own (`use_pos_embed=False`) and take no text
    (`joint_attention_dim=None`): diffusers gives them SD3's; ours gives them the same from our transformer."""
    def sd35_controlnet():
        with _seeded(17):
            return _randomize(SD3ControlNetModel(
                sample_size=SAMPLE_SIZE, patch_size=2, in_channels=LATENT_CHANNELS, num_layers=1, attention_head_dim=8,
                num_attention_heads=4, joint_attention_dim=None, caption_projection_dim=32,
                pooled_projection_dim=2 * CLIP_DIM, out_channels=LATENT_CHANNELS, pos_embed_max_size=16,
                use_pos_embed=False, force_zeros_for_pooled_projection=False,
            ), 0.05)

    reference = StableDiffusion3ControlNetPipeline(**components, controlnet=sd35_controlnet())
    ours = MMDiTControlNetPipeline(**{**components, "transformer": transformers["ours"]}, controlnet=sd35_controlnet())
    torch.testing.assert_close(ours.controlnet.pos_embed.state_dict(), reference.controlnet.pos_embed.state_dict())
    _assert_same(_images(reference, control_image=picture(7)), _images(ours, control_image=picture(7)))


def test_mmdit_controlnet_pipeline_runs_our_own_layouts(tmp_path):
    """What diffusers' pipeline cannot run: a one-CLIP transformer trained with masked text, from an MMDiTPipeline
    (`from_pipe`), with its folder's sampler settings; saved and loaded with its ControlNet."""
    base = tiny_mmdit_pipeline(seed=0, layout="clip_t5", masked=True)
    base.register_sampler_defaults(num_inference_steps=2, guidance_scale=3.0)
    with _seeded(18):
        controlnet = _randomize(SD3ControlNetModel(
            sample_size=SAMPLE_SIZE, patch_size=2, in_channels=LATENT_CHANNELS, num_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=T5_DIM, caption_projection_dim=32,
            pooled_projection_dim=CLIP_DIM, out_channels=LATENT_CHANNELS, pos_embed_max_size=16,
        ), 0.05)
    pipe = MMDiTControlNetPipeline.from_pipe(base, controlnet=controlnet)
    controlled = _images(pipe, num_inference_steps=None, guidance_scale=None, control_image=picture(8))
    free = _images(pipe, num_inference_steps=None, guidance_scale=None, control_image=picture(8),
                   controlnet_conditioning_scale=0.0)
    np.testing.assert_allclose(free, _images(base, num_inference_steps=None, guidance_scale=None), atol=1e-6)
    assert np.abs(controlled - free).max() > 1e-3
    # skip-layer guidance: its extra call on the positive half gets that half's control latents
    four_steps = dict(num_inference_steps=4, guidance_scale=None, control_image=picture(8))
    skipped = _images(pipe, **four_steps, skip_guidance_layers=[0], skip_layer_guidance_start=0.0,
                      skip_layer_guidance_stop=1.0)
    assert np.abs(skipped - _images(pipe, **four_steps)).max() > 1e-4
    pipe.save_pretrained(tmp_path)
    reloaded = MMDiTControlNetPipeline.from_pretrained(tmp_path)
    np.testing.assert_allclose(_images(reloaded, num_inference_steps=None, guidance_scale=None,
                                       control_image=picture(8)), controlled, atol=1e-6)


def test_mmdit_controlnet_pipeline_errors(components, transformers):
    _, ours = _ours_and_sd3(components, transformers, SD3MultiControlNetModel([tiny_controlnet(seed=19)] * 2))
    with pytest.raises(InputError, match="control_image"):
        ours(PROMPT, num_inference_steps=1)
    with pytest.raises(InputError, match="list of 2 images"):
        ours(PROMPT, num_inference_steps=1, control_image=picture(1))
    with pytest.raises(InputError, match="controlnet_conditioning_scale"):
        ours(PROMPT, num_inference_steps=1, control_image=[picture(1)] * 2, controlnet_conditioning_scale=[1.0])


# ---------------------------------------------------------------------------------------------------------------
# Perturbed-attention guidance
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("guidance_scale", [1.0, 5.0], ids=["pag-only", "pag-and-cfg"])
def test_pag_pipeline_same_images(components, transformers, guidance_scale):
    def build(transformer):
        return StableDiffusion3PAGPipeline(**{**components, "transformer": transformer},
                                           pag_applied_layers=["blocks.0"])

    expected, got = _both(transformers, build, guidance_scale=guidance_scale, pag_scale=3.0)
    _assert_same(expected, got)
    unperturbed = _images(build(transformers["ours"]), guidance_scale=guidance_scale, pag_scale=0.0)
    # the perturbed branch changes the image (1e-3 here; the two transformers agree to ~1e-6)
    assert np.abs(got - unperturbed).max() > 5e-4
    # the pipeline puts the transformer's own processors back after the call
    assert {type(p) for p in transformers["ours"].attn_processors.values()} == {
        type(p) for p in MMDiTTransformer2DModel.from_sd3(transformers["sd3"]).attn_processors.values()
    }


def test_pag_img2img_pipeline_same_images(components, transformers):
    def build(transformer):
        return StableDiffusion3PAGImg2ImgPipeline(
            **{**components, "transformer": transformer}, pag_applied_layers=["blocks.0", "blocks.1"]
        )

    expected, got = _both(transformers, build, image=picture(5), strength=0.8, pag_scale=2.0, num_inference_steps=4)
    _assert_same(expected, got)
