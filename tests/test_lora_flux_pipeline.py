"""A diffusers-format FLUX.1 LoRA file (transformer and CLIP keys, written by `FluxPipeline.save_lora_weights`) on
`MMDiTPipeline.from_pretrained(<FLUX.1 folder>)` (an `MMDiTFluxPipeline`, its transformer converted on load): the
images of `FluxPipeline.load_lora_weights` with the same file, and the base images again after
`unload_lora_weights`. The folder is a tiny random FLUX.1 pipeline (tests/tiny_flux.py), the LoRA random and not zero
(tests/lora_fixtures.py) on FLUX-only module names (so ours converts it) and on CLIP's attention and MLP layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from lora_fixtures import CLIP_TARGETS, FLUX_TARGETS, peft_lora
from mmdit_diffusers import MMDiTFluxPipeline, MMDiTPipeline
from tiny_flux import save_tiny_flux_pipeline

PROMPTS = ["a red circle", "two blue squares left of a green triangle"]
T5_TOKENS = 16


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    return save_tiny_flux_pipeline(tmp_path_factory.mktemp("lora-flux-pipeline") / "flux", seed=0)


@pytest.fixture(scope="module")
def lora_folder(flux_folder, tmp_path_factory):
    """`pytorch_lora_weights.safetensors` with `transformer.` and `text_encoder.` (CLIP) keys, by diffusers' writer."""
    donor = FluxPipeline.from_pretrained(flux_folder)
    transformer, transformer_config = peft_lora(donor.transformer, FLUX_TARGETS, seed=1)
    clip, clip_config = peft_lora(donor.text_encoder, CLIP_TARGETS, seed=2)
    folder = tmp_path_factory.mktemp("flux-lora")
    FluxPipeline.save_lora_weights(folder, transformer_lora_layers=transformer, text_encoder_lora_layers=clip,
                                   transformer_lora_adapter_metadata=transformer_config,
                                   text_encoder_lora_adapter_metadata=clip_config)
    return str(folder / "pytorch_lora_weights.safetensors")


def _pipelines(folder):
    flux, ours = FluxPipeline.from_pretrained(folder), MMDiTPipeline.from_pretrained(folder)
    assert isinstance(ours, MMDiTFluxPipeline)
    for pipe in (flux, ours):
        pipe.set_progress_bar_config(disable=True)
    return flux, ours


def _images(pipe, **call) -> np.ndarray:
    return pipe(PROMPTS, num_inference_steps=2, guidance_scale=3.5, max_sequence_length=T5_TOKENS, height=16,
                width=16, output_type="np", generator=torch.Generator().manual_seed(0), **call).images


def _pooled(pipe) -> torch.Tensor:
    """CLIP's pooled vector, the only CLIP output FLUX.1 uses (so a CLIP LoRA acts through it alone)."""
    with torch.no_grad():
        return pipe.encode_prompt(PROMPTS, max_sequence_length=T5_TOKENS)[1]


def test_flux_lora_file_with_clip_keys_equals_flux_pipeline_on_the_same_file(flux_folder, lora_folder):
    flux, ours = _pipelines(flux_folder)
    base, base_pooled = _images(ours), _pooled(ours)
    np.testing.assert_allclose(base, _images(flux), atol=1e-4, rtol=0)  # the same pipeline before any LoRA

    flux.load_lora_weights(lora_folder)
    ours.load_lora_weights(lora_folder)
    assert "default_0" in ours.transformer.peft_config and "default_0" in ours.text_encoder.peft_config
    assert not hasattr(ours.text_encoder_2, "peft_config")  # FLUX.1's text_encoder_2 is T5: the file has no keys for it
    expected_pooled = _pooled(flux)
    assert (expected_pooled - base_pooled).abs().max() > 1e-2  # the CLIP part of the file matters
    torch.testing.assert_close(_pooled(ours), expected_pooled, atol=1e-5, rtol=0)
    expected = _images(flux)
    assert np.abs(expected - base).max() > 1e-2
    np.testing.assert_allclose(_images(ours), expected, atol=1e-4, rtol=0)
    half = {"joint_attention_kwargs": {"scale": 0.5}}  # scales the CLIP's LoRA too, as FluxPipeline
    expected_half = _images(flux, **half)
    assert np.abs(expected_half - expected).max() > 1e-3
    np.testing.assert_allclose(_images(ours, **half), expected_half, atol=1e-4, rtol=0)

    ours.unload_lora_weights()  # the CLIP's LoRA too
    assert not hasattr(ours.text_encoder, "peft_config")
    torch.testing.assert_close(_pooled(ours), base_pooled, atol=1e-6, rtol=0)
    np.testing.assert_allclose(_images(ours), base, atol=1e-6, rtol=0)
