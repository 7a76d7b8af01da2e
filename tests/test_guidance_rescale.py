"""Guidance rescale (`guidance_rescale`, Lin et al. 2023, as SDXL's pipeline): the guided velocity is scaled toward
the per-image standard deviation of the conditional one; 0 (the default without stored defaults) is plain
classifier-free guidance, and bad values are refused naming the argument."""

import numpy as np
import pytest
import torch

from mmdit_diffusers import MMDiTImg2ImgPipeline, MMDiTInpaintPipeline, MMDiTPipeline
from mmdit_diffusers.errors import InputError

PROMPT = "a red circle"


def sample(pipe, **kwargs) -> np.ndarray:
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), num_inference_steps=2, output_type="np",
                **kwargs).images


def stepped_velocities(pipe, monkeypatch, cond: torch.Tensor, uncond: torch.Tensor, **kwargs) -> list[torch.Tensor]:
    """The velocities the scheduler steps with when the transformer predicts `uncond` for the negative half of the
    guidance batch and `cond` for the positive one."""
    monkeypatch.setattr(pipe, "_velocity", lambda context, **inputs: torch.cat([uncond, cond]))
    stepped = []
    original_step = pipe.scheduler.step

    def step(velocity, *args, **step_kwargs):
        stepped.append(velocity.clone())
        return original_step(velocity, *args, **step_kwargs)

    monkeypatch.setattr(pipe.scheduler, "step", step)
    pipe(PROMPT, num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0), **kwargs)
    return stepped


def test_the_stepped_velocity_is_the_rescaled_guidance_of_lin_et_al(pipe, monkeypatch):
    generator = torch.Generator().manual_seed(1)
    shape = (1, pipe.transformer.in_channels, 8, 8)
    cond = torch.randn(shape, generator=generator) * 0.5 + 0.2
    uncond = torch.randn(shape, generator=generator) * 1.5 - 0.3
    guidance_scale, phi = 4.0, 0.7
    stepped = stepped_velocities(pipe, monkeypatch, cond, uncond, guidance_scale=guidance_scale, guidance_rescale=phi)

    guided = uncond + guidance_scale * (cond - uncond)
    values, cond_values = guided.flatten().double(), cond.flatten().double()
    std = ((values - values.mean()) ** 2).sum().div(values.numel() - 1).sqrt()  # torch.std's unbiased estimate
    cond_std = ((cond_values - cond_values.mean()) ** 2).sum().div(cond_values.numel() - 1).sqrt()
    expected = phi * guided * float(cond_std / std) + (1 - phi) * guided
    assert len(stepped) == 2
    for velocity in stepped:
        torch.testing.assert_close(velocity, expected, rtol=1e-5, atol=1e-6)


def test_phi_one_gives_the_velocity_the_conditional_spread_per_image(pipe, monkeypatch):
    generator = torch.Generator().manual_seed(2)
    shape = (1, pipe.transformer.in_channels, 8, 8)
    cond, uncond = torch.randn(shape, generator=generator), 3 * torch.randn(shape, generator=generator)
    (velocity, _) = stepped_velocities(pipe, monkeypatch, cond, uncond, guidance_scale=5.0, guidance_rescale=1.0)
    torch.testing.assert_close(velocity.std(), cond.std())


def test_zero_is_plain_classifier_free_guidance(pipe, monkeypatch):
    generator = torch.Generator().manual_seed(3)
    shape = (1, pipe.transformer.in_channels, 8, 8)
    cond, uncond = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    stepped = stepped_velocities(pipe, monkeypatch, cond, uncond, guidance_scale=3.0, guidance_rescale=0.0)
    assert all(torch.equal(velocity, uncond + 3.0 * (cond - uncond)) for velocity in stepped)


def test_off_by_default_and_changes_the_images_when_on(pipe):
    plain = sample(pipe, guidance_scale=5.0)
    assert np.array_equal(plain, sample(pipe, guidance_scale=5.0, guidance_rescale=0.0))
    assert not np.allclose(plain, sample(pipe, guidance_scale=5.0, guidance_rescale=0.7))


def test_no_effect_without_guidance(pipe):
    assert np.array_equal(sample(pipe, guidance_scale=1.0), sample(pipe, guidance_scale=1.0, guidance_rescale=0.7))


@pytest.mark.parametrize("cls", [MMDiTImg2ImgPipeline, MMDiTInpaintPipeline])
def test_image_pipelines_take_it_too(pipe, cls):
    """img2img and inpainting share `MMDiTPipeline`'s guidance step, so the argument acts there as well."""
    other = cls.from_pipe(pipe)
    other.set_progress_bar_config(disable=True)
    image = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
    extra = {"image": image} if cls is MMDiTImg2ImgPipeline else {"image": image, "mask_image": np.ones((16, 16, 1), dtype=np.float32)}

    def draw(**kwargs):
        return other(PROMPT, generator=torch.Generator().manual_seed(0), num_inference_steps=4, strength=1.0,
                     guidance_scale=5.0, output_type="np", **extra, **kwargs).images

    assert np.array_equal(draw(), draw(guidance_rescale=0.0))
    assert not np.allclose(draw(), draw(guidance_rescale=0.7))
    with pytest.raises(InputError, match="`guidance_rescale`"):
        draw(guidance_rescale=2.0)


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), "0.5", True, [0.5]])
def test_bad_values_are_refused_naming_the_argument(pipe, value):
    with pytest.raises(InputError, match="`guidance_rescale`.*must be a number in \\[0, 1\\]"):
        sample(pipe, guidance_scale=5.0, guidance_rescale=value)


def test_a_bad_stored_default_is_refused(pipe):
    fresh = MMDiTPipeline(**pipe.components)
    with pytest.raises(InputError, match="`guidance_rescale`"):
        fresh.register_sampler_defaults(guidance_rescale=1.2)
