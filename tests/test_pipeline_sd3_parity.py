"""MMDiTPipeline on a diffusers-format SD3 folder gives diffusers' StableDiffusion3Pipeline's images.

The folder is a tiny random SD3 pipeline built with diffusers' own classes (SD3Transformer2DModel, AutoencoderKL, two
CLIPTextModelWithProjection, T5EncoderModel, local tokenizers) and saved with `save_pretrained`.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from peft import LoraConfig, get_peft_model_state_dict

from mmdit_diffusers import MMDiTTransformer2DModel
from mmdit_diffusers.pipelines import MMDiTPipeline
from tiny_pipeline import save_tiny_sd3_pipeline

PROMPTS = ["a red circle", "two blue squares left of a green triangle"]


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe, guidance_scale, **kwargs):
    return pipe(
        prompt=PROMPTS,
        num_images_per_prompt=2,
        num_inference_steps=3,
        guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **kwargs,
    ).images


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    return save_tiny_sd3_pipeline(tmp_path_factory.mktemp("tiny-sd3"), seed=0)


@pytest.fixture(scope="module")
def pipelines(sd3_dir):
    """(diffusers' SD3 pipeline, ours) with T5 and without (`text_encoder_3=None, tokenizer_3=None` for both)."""
    no_t5 = dict(text_encoder_3=None, tokenizer_3=None)
    return {
        True: (_quiet(StableDiffusion3Pipeline.from_pretrained(sd3_dir)), _quiet(MMDiTPipeline.from_pretrained(sd3_dir))),
        False: (
            _quiet(StableDiffusion3Pipeline.from_pretrained(sd3_dir, **no_t5)),
            _quiet(MMDiTPipeline.from_pretrained(sd3_dir, **no_t5)),
        ),
    }


@pytest.mark.parametrize("with_t5", [True, False], ids=["t5", "no-t5"])
@pytest.mark.parametrize("guidance_scale", [1.0, 5.0], ids=["no-cfg", "cfg"])
def test_same_images_as_stable_diffusion_3(pipelines, with_t5, guidance_scale):
    reference, ours = pipelines[with_t5]
    expected, got = _images(reference, guidance_scale), _images(ours, guidance_scale)
    assert got.shape == expected.shape == (4, 16, 16, 3)
    assert np.abs(got - expected).max() <= 1e-4
    # the random SD3 weights are not trivial: the two prompts give different images
    assert np.abs(expected[0] - expected[2]).max() > 1e-2


def test_sd3_folder_is_converted_and_unmasked(pipelines):
    reference, ours = pipelines[True]
    assert isinstance(ours.transformer, MMDiTTransformer2DModel)
    assert not ours.transformer.config.use_text_attention_mask
    assert ours.default_sample_size == reference.default_sample_size
    seen = []
    handle = ours.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("encoder_attention_mask")), with_kwargs=True
    )
    try:
        _images(ours, 5.0)
    finally:
        handle.remove()
    assert seen and all(mask is None for mask in seen)


def test_same_text_conditioning_as_stable_diffusion_3(pipelines):
    for with_t5 in (True, False):
        reference, ours = pipelines[with_t5]
        expected = reference.encode_prompt(PROMPTS, None, None, negative_prompt="a cat", num_images_per_prompt=2)
        got = ours.encode_prompt(PROMPTS, negative_prompt="a cat", num_images_per_prompt=2)
        for e, g in zip(expected, got):
            torch.testing.assert_close(g, e, rtol=0, atol=1e-6)


def test_sd3_lora_parity(sd3_dir, tmp_path):
    """A LoRA trained on SD3's module names (attention, MLP, patch embedding, output layers) loads into the
    converted transformer and gives SD3's images with the same LoRA."""
    reference = _quiet(StableDiffusion3Pipeline.from_pretrained(sd3_dir, text_encoder_3=None, tokenizer_3=None))
    ours = _quiet(MMDiTPipeline.from_pretrained(sd3_dir, text_encoder_3=None, tokenizer_3=None))
    donor = copy.deepcopy(reference.transformer)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        init_lora_weights=False,
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_v_proj", "to_add_out", "ff.net.2",
                        "proj_out", "norm_out.linear", "norm1_context.linear", "pos_embed.proj"],
    )
    donor.add_adapter(config)
    StableDiffusion3Pipeline.save_lora_weights(
        tmp_path, transformer_lora_layers=get_peft_model_state_dict(donor), transformer_lora_adapter_metadata=config.to_dict()
    )
    without = _images(ours, 3.0)
    reference.load_lora_weights(tmp_path)
    ours.load_lora_weights(tmp_path)
    with_lora = _images(ours, 3.0)
    assert np.abs(with_lora - without).max() > 1e-3
    assert np.abs(with_lora - _images(reference, 3.0)).max() <= 1e-4
