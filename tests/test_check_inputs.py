"""`check_inputs` (diffusers' name) is the one check of a pipeline call: every refusal an `InputError` naming the
argument, whichever of its checks (`pipelines/call_checks.py`) finds the mistake; diffusers-style direct calls work."""

from __future__ import annotations

import pytest
import torch

from mmdit_diffusers import InputError, MMDiTPipeline
from mmdit_diffusers.pipelines import call_checks
from tiny_flux import save_tiny_flux_pipeline

PROMPT = "a red circle"


def test_direct_call_returns_the_size_in_pixels(pipe):
    default = pipe.default_sample_size * pipe.vae_scale_factor
    assert pipe.check_inputs(PROMPT, None, None, None, None) == (default, default)
    assert pipe.check_inputs(PROMPT, None, None, 32, 16) == (32, 16)


@pytest.mark.parametrize("kwargs, name", [
    (dict(height=18), "height"),                                   # formerly checked twice
    (dict(generator="cuda"), "generator"),                         # the type
    (dict(generator=[torch.Generator()] * 3), "generator"),        # the count
    (dict(latents=torch.zeros(1, 4, 4, dtype=torch.int64)), "latents"),  # the dtype
    (dict(latents=torch.zeros(1, 4, 4, 4)), "latents"),            # the shape
    (dict(output_type="jpeg"), "output_type"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt"),
    (dict(callback_on_step_end_tensor_inputs=["noise"]), "callback_on_step_end_tensor_inputs"),
    (dict(prompt_2=3), "prompt_2"),
])
def test_each_mistake_is_one_input_error_naming_the_argument(pipe, kwargs, name):
    kwargs = dict(dict(height=16, width=16), **kwargs)
    direct = dict(kwargs)
    with pytest.raises(InputError, match=f"`{name}"):
        pipe.check_inputs(PROMPT, direct.pop("prompt_2", None), None, direct.pop("height"), direct.pop("width"),
                          **direct)
    with pytest.raises(InputError, match=f"`{name}"):
        pipe(prompt=PROMPT, **dict(dict(output_type="latent", num_inference_steps=1), **kwargs))


def test_embeds_pairing_is_an_input_error(pipe):
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False)[:4]
    with pytest.raises(InputError, match="`prompt_embeds` needs `pooled_prompt_embeds`"):
        pipe.check_inputs(None, None, None, 16, 16, prompt_embeds=embeds)
    with pytest.raises(InputError, match="`prompt_embeds` holds 1 prompts but `pooled_prompt_embeds` 2"):
        pipe.check_inputs(None, None, None, 16, 16, prompt_embeds=embeds, pooled_prompt_embeds=pooled.repeat(2, 1))


def test_one_home_per_check():
    assert not hasattr(call_checks, "check_call")


def test_flux_latents_checked_in_check_inputs(tmp_path):
    pipe = MMDiTPipeline.from_pretrained(save_tiny_flux_pipeline(tmp_path, guidance_embeds=False))
    pipe.set_progress_bar_config(disable=True)
    height, width = pipe.check_inputs(PROMPT, None, None, 32, 32)
    h, w, c, p = height // pipe.vae_scale_factor, width // pipe.vae_scale_factor, pipe.transformer.in_channels, 2
    pipe.check_inputs(PROMPT, None, None, 32, 32, latents=torch.zeros(1, c, h, w))
    pipe.check_inputs(PROMPT, None, None, 32, 32, latents=torch.zeros(1, (h // p) * (w // p), c * p * p))
    with pytest.raises(InputError, match=r"`latents` has shape .*; expected \[.*\], or FLUX's packed \["):
        pipe.check_inputs(PROMPT, None, None, 32, 32, latents=torch.zeros(1, 5, c))
