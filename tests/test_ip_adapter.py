"""SD3.5's IP-Adapter on `MMDiTPipeline` gives the images of diffusers' `StableDiffusion3Pipeline`.

The adapter is tiny and random, in diffusers' SD3 layout (`ip-adapter.safetensors` with `image_proj.*` and
`ip_adapter.<block>.*`, built from diffusers' `IPAdapterTimeImageProjection` and `SD3IPAdapterJointAttnProcessor2_0`),
with a tiny random SigLIP image encoder and its image processor in `image_encoder/`, all written by the test. Both
pipelines load the same tiny SD3 folder and the same adapter with `load_ip_adapter`.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from diffusers import (
    StableDiffusion3ControlNetPipeline,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3InpaintPipeline,
    StableDiffusion3Pipeline,
)
from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0
from diffusers.models.embeddings import IPAdapterTimeImageProjection
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

from mmdit_diffusers import InputError, MMDiTTransformer2DModel
from mmdit_diffusers.models.attention import MMDiTAttnProcessor
from mmdit_diffusers.pipelines import MMDiTControlNetPipeline, MMDiTImg2ImgPipeline, MMDiTInpaintPipeline, MMDiTPipeline
from test_controlnet_pag import tiny_controlnet
from tiny_pipeline import (
    _randomize,
    _seeded,
    save_tiny_sd3_pipeline,
    tiny_mmdit_pipeline,
    tiny_sd3_components,
    tiny_sd3_transformer,
)

PROMPTS = ["a red circle", "two blue squares left of a green triangle"]
WIDTH, HEAD_DIM, DEPTH = 32, 8, 2  # the tiny SD3 transformer's (tiny_pipeline.tiny_sd3_transformer)
ENCODER_WIDTH = 16


def save_tiny_ip_adapter(folder, depth: int = DEPTH, head_dim: int = HEAD_DIM, seed: int = 7) -> str:
    """A tiny random SD3 IP-Adapter for a transformer of width 32 (heads of `head_dim`) in `folder`:
    `ip-adapter.safetensors` and `image_encoder/` (SiglipVisionModel + SiglipImageProcessor)."""
    with _seeded(seed):
        encoder = SiglipVisionModel(SiglipVisionConfig(
            hidden_size=ENCODER_WIDTH, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            image_size=32, patch_size=8,
        ))
        # diffusers' loader reads the resampler's sizes off the weights but always builds 4 layers of 64-wide heads
        image_proj = IPAdapterTimeImageProjection(
            embed_dim=ENCODER_WIDTH, output_dim=WIDTH, hidden_dim=32, depth=4, dim_head=64, heads=1, num_queries=4,
            timestep_in_dim=16,
        )
        processors = [
            SD3IPAdapterJointAttnProcessor2_0(hidden_size=WIDTH, ip_hidden_states_dim=WIDTH, head_dim=head_dim,
                                              timesteps_emb_dim=32)
            for _ in range(depth)
        ]
        _randomize(encoder, 0.1), _randomize(image_proj, 0.1)
        for processor in processors:
            _randomize(processor, 0.3)
    encoder.save_pretrained(os.path.join(folder, "image_encoder"))
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(os.path.join(folder, "image_encoder"))
    weights = {f"image_proj.{k}": v for k, v in image_proj.state_dict().items()}
    for index, processor in enumerate(processors):
        weights.update({f"ip_adapter.{index}.{k}": v for k, v in processor.state_dict().items()})
    save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(folder, "ip-adapter.safetensors"))
    return str(folder)


def picture(seed: int) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(40, 48, 3) * 255).astype("uint8"))


def _load_adapter(pipe, folder):
    pipe.load_ip_adapter(folder, weight_name="ip-adapter.safetensors",
                         image_encoder_folder=os.path.join(folder, "image_encoder"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe, guidance_scale=5.0, **kwargs) -> np.ndarray:
    return pipe(prompt=PROMPTS, num_images_per_prompt=2, num_inference_steps=3, guidance_scale=guidance_scale,
                generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    return save_tiny_ip_adapter(tmp_path_factory.mktemp("tiny-ip-adapter"))


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    return save_tiny_sd3_pipeline(tmp_path_factory.mktemp("tiny-sd3"), seed=0)


@pytest.fixture(scope="module")
def pipelines(sd3_dir, adapter_dir):
    """(StableDiffusion3Pipeline, MMDiTPipeline) from the same SD3 folder, the same adapter loaded into both."""
    return (_load_adapter(StableDiffusion3Pipeline.from_pretrained(sd3_dir), adapter_dir),
            _load_adapter(MMDiTPipeline.from_pretrained(sd3_dir), adapter_dir))


@pytest.fixture
def default_scale(pipelines):
    yield
    for pipe in pipelines:
        pipe.set_ip_adapter_scale(0.5)  # the processors' default


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0], ids=["no-cfg", "cfg"])
def test_same_images_as_stable_diffusion_3(pipelines, guidance_scale, default_scale):
    reference, ours = pipelines
    expected = _images(reference, guidance_scale, ip_adapter_image=picture(0))
    got = _images(ours, guidance_scale, ip_adapter_image=picture(0))
    assert got.shape == expected.shape == (4, 16, 16, 3)
    assert np.abs(got - expected).max() <= 1e-4
    # the adapter changes the image
    ours.set_ip_adapter_scale(0.0)
    assert np.abs(got - _images(ours, guidance_scale, ip_adapter_image=picture(0))).max() > 1e-3


def test_set_ip_adapter_scale_as_stable_diffusion_3(pipelines, default_scale):
    for pipe in pipelines:
        pipe.set_ip_adapter_scale(0.9)
    expected, got = (_images(pipe, ip_adapter_image=picture(1)) for pipe in pipelines)
    assert np.abs(got - expected).max() <= 1e-4
    assert pipelines[1].is_ip_adapter_active


def test_image_embeds_as_stable_diffusion_3(pipelines):
    """`ip_adapter_image_embeds` ([negative; positive] with guidance) gives what the image gives, as in SD3."""
    reference, ours = pipelines
    embeds = ours.prepare_ip_adapter_image_embeds(picture(2), None, torch.device("cpu"), 1, True)
    assert embeds.shape[0] == 2 and not embeds[0].any()  # the unconditional half is zeros, as SD3's
    from_image = _images(ours, ip_adapter_image=picture(2))
    got = _images(ours, ip_adapter_image_embeds=embeds)
    assert np.abs(got - from_image).max() <= 1e-6
    assert np.abs(got - _images(reference, ip_adapter_image_embeds=embeds)).max() <= 1e-4


@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_img2img_and_inpaint_as_stable_diffusion_3(adapter_dir, tmp_path, task):
    """The image prompt reaches the redrawing pipelines too, as in SD3's img2img and inpainting pipelines."""
    reference_class, our_class = {
        "img2img": (StableDiffusion3Img2ImgPipeline, MMDiTImg2ImgPipeline),
        "inpaint": (StableDiffusion3InpaintPipeline, MMDiTInpaintPipeline),
    }[task]
    # SD3's inpainting takes 16 latent channels, and decodes without the VAE's shift (see test_img2img_inpaint.py)
    folder = save_tiny_sd3_pipeline(tmp_path, seed=3, latent_channels=16, shift_factor=0.0)
    start = dict(image=picture(3).resize((16, 16)), strength=0.8)
    if task == "inpaint":
        start["mask_image"] = Image.fromarray(np.kron(np.eye(2), np.ones((8, 8))).astype("uint8") * 255)
    reference, ours = (_load_adapter(cls.from_pretrained(folder), adapter_dir) for cls in (reference_class, our_class))
    expected, got = (_images(pipe, ip_adapter_image=picture(4), **start) for pipe in (reference, ours))
    assert got.shape == expected.shape == (4, 16, 16, 3)
    assert np.abs(got - expected).max() <= 1e-4
    assert np.abs(got - _images(ours, **start)).max() > 1e-3  # without the image prompt: another picture


def test_controlnet_as_stable_diffusion_3(adapter_dir):
    """ControlNet residuals and the image prompt together, as SD3's ControlNet pipeline combines them."""
    components = tiny_sd3_components(seed=0)
    controlnet = tiny_controlnet(seed=14)
    reference = StableDiffusion3ControlNetPipeline(**components, controlnet=controlnet)
    transformer = MMDiTTransformer2DModel.from_sd3(components["transformer"]).eval()
    ours = MMDiTControlNetPipeline(**{**components, "transformer": transformer}, controlnet=controlnet)
    call = dict(control_image=picture(5).resize((16, 16)), controlnet_conditioning_scale=0.8)

    def images(pipe, **kwargs):
        with torch.random.fork_rng(devices=[]):  # SD3's ControlNet pipeline samples the control latents globally
            torch.manual_seed(0)
            return _images(pipe, **call, **kwargs)

    for pipe in (reference, ours):
        _load_adapter(pipe, adapter_dir)
    expected, got = images(reference, ip_adapter_image=picture(4)), images(ours, ip_adapter_image=picture(4))
    assert got.shape == expected.shape == (4, 16, 16, 3)
    assert np.abs(got - expected).max() <= 1e-4
    assert np.abs(got - images(ours)).max() > 1e-3  # without the image prompt: another picture


def test_caller_joint_attention_kwargs_left_alone(pipelines):
    kwargs = {"scale": 1.0}
    pipelines[1](PROMPTS[0], num_inference_steps=2, ip_adapter_image=picture(0), joint_attention_kwargs=kwargs,
                 output_type="latent")
    assert kwargs == {"scale": 1.0}


def test_transformer_outputs_as_sd3(adapter_dir):
    """The transformer alone: SD3's and ours (converted from it) with the same adapter weights, the same image
    features under `joint_attention_kwargs["ip_adapter_image_embeds"]`."""
    weights = load_file(os.path.join(adapter_dir, "ip-adapter.safetensors"))
    state = {prefix: {k[len(prefix) + 1:]: v for k, v in weights.items() if k.startswith(prefix + ".")}
             for prefix in ("image_proj", "ip_adapter")}
    sd3 = tiny_sd3_transformer(seed=0)
    ours = MMDiTTransformer2DModel.from_sd3(sd3)
    for model in (sd3, ours):
        model._load_ip_adapter_weights({k: dict(v) for k, v in state.items()}, low_cpu_mem_usage=False)
    torch.manual_seed(1)
    inputs = dict(hidden_states=torch.randn(2, 4, 8, 8), encoder_hidden_states=torch.randn(2, 12, 64),
                  pooled_projections=torch.randn(2, 64), timestep=torch.tensor([900.0, 300.0]))
    embeds = torch.randn(2, 16, ENCODER_WIDTH)
    outputs, leftovers = [], []
    for model in (sd3, ours):
        kwargs = {"ip_adapter_image_embeds": embeds}
        with torch.no_grad():
            outputs.append(model(**inputs, joint_attention_kwargs=kwargs).sample)
        leftovers.append(kwargs)
    assert (outputs[1] - outputs[0]).abs().max() <= 1e-5
    assert leftovers[0].keys() == leftovers[1].keys() == {"ip_adapter_image_embeds"}  # both work on a copy


def test_unload_ip_adapter_restores_the_pipeline(sd3_dir, adapter_dir):
    pipe = MMDiTPipeline.from_pretrained(sd3_dir)
    pipe.set_progress_bar_config(disable=True)
    plain = _images(pipe)
    _load_adapter(pipe, adapter_dir)
    assert pipe.image_encoder is not None and pipe.feature_extractor is not None
    pipe.unload_ip_adapter()
    assert pipe.image_encoder is None and pipe.feature_extractor is None and pipe.transformer.image_proj is None
    assert all(isinstance(p, MMDiTAttnProcessor) for p in pipe.transformer.attn_processors.values())
    assert np.abs(_images(pipe) - plain).max() == 0


def test_image_encoder_saved_and_loaded_with_the_pipeline(pipelines, tmp_path):
    ours = pipelines[1]
    ours.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["image_encoder"] == ["transformers", "SiglipVisionModel"]
    reloaded = MMDiTPipeline.from_pretrained(tmp_path)
    assert isinstance(reloaded.image_encoder, SiglipVisionModel)
    torch.testing.assert_close(reloaded.image_encoder.state_dict(), ours.image_encoder.state_dict())


def test_sd35_folder_image_encoder_loaded_as_stable_diffusion_3(sd3_dir, adapter_dir, tmp_path):
    """An SD3.5 folder that ships the IP-Adapter's image encoder and feature extractor: both pipelines load them,
    and an adapter loaded without its own encoder (`image_encoder_folder=None`) uses them."""
    folder = tmp_path / "sd35"
    shutil.copytree(sd3_dir, folder)
    shutil.copytree(os.path.join(adapter_dir, "image_encoder"), folder / "image_encoder")
    SiglipImageProcessor.from_pretrained(os.path.join(adapter_dir, "image_encoder")).save_pretrained(
        folder / "feature_extractor")
    index = json.loads((folder / "model_index.json").read_text())
    index.update(image_encoder=["transformers", "SiglipVisionModel"],
                 feature_extractor=["transformers", "SiglipImageProcessor"])
    (folder / "model_index.json").write_text(json.dumps(index))
    images = []
    for cls in (StableDiffusion3Pipeline, MMDiTPipeline):
        pipe = cls.from_pretrained(folder)
        assert isinstance(pipe.image_encoder, SiglipVisionModel) and pipe.feature_extractor is not None
        pipe.load_ip_adapter(adapter_dir, weight_name="ip-adapter.safetensors", image_encoder_folder=None)
        pipe.set_progress_bar_config(disable=True)
        images.append(_images(pipe, ip_adapter_image=picture(3)))
    assert np.abs(images[1] - images[0]).max() <= 1e-4


def test_folders_without_image_encoder_entries_still_load(tmp_path):
    """Folders saved before the image encoder became an optional component have no entry for it."""
    tiny_mmdit_pipeline(seed=0).save_pretrained(tmp_path)
    index_file = tmp_path / "model_index.json"
    index = json.loads(index_file.read_text())
    for name in ("image_encoder", "feature_extractor"):
        index.pop(name, None)
    index_file.write_text(json.dumps(index))
    pipe = MMDiTPipeline.from_pretrained(tmp_path)
    assert pipe.image_encoder is None and pipe.feature_extractor is None


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------
def test_image_without_adapter_is_refused(sd3_dir):
    pipe = MMDiTPipeline.from_pretrained(sd3_dir)
    with pytest.raises(InputError, match="load_ip_adapter"):
        pipe(PROMPTS[0], num_inference_steps=1, ip_adapter_image=picture(0))


def test_image_and_embeds_together_are_refused(pipelines):
    with pytest.raises(InputError, match="not both"):
        pipelines[1](PROMPTS[0], num_inference_steps=1, ip_adapter_image=picture(0),
                     ip_adapter_image_embeds=torch.zeros(2, 16, ENCODER_WIDTH))


def test_embeds_of_wrong_shape_are_refused(pipelines):
    with pytest.raises(InputError, match="ip_adapter_image_embeds"):
        pipelines[1](PROMPTS[0], num_inference_steps=1, ip_adapter_image_embeds=torch.zeros(1, 16, ENCODER_WIDTH))


def test_text_mask_is_refused_not_ignored(tmp_path):
    """A transformer trained with masked text padding: the IP-Adapter's attention cannot mask, so a batch that needs
    a mask (guidance: "" and the prompt differ in length) is refused; one that needs none runs."""
    pipe = tiny_mmdit_pipeline(seed=0, layout="sd3", masked=True)  # width 32, heads of 16
    _load_adapter(pipe, save_tiny_ip_adapter(tmp_path, head_dim=16))
    pipe(PROMPTS[0], guidance_scale=1.0, num_inference_steps=1, ip_adapter_image=picture(0), output_type="latent")
    with pytest.raises(InputError, match="cannot mask"):
        pipe(PROMPTS[0], guidance_scale=5.0, num_inference_steps=1, ip_adapter_image=picture(0), output_type="latent")


def test_adapter_for_another_depth_is_refused(sd3_dir, tmp_path):
    pipe = MMDiTPipeline.from_pretrained(sd3_dir)
    with pytest.raises(InputError, match="blocks"):
        _load_adapter(pipe, save_tiny_ip_adapter(tmp_path, depth=3))
