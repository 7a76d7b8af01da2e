"""The guidance options of the MMDiT pipelines: guidance rescale (`guidance_rescale`, Lin et al. 2023, as SDXL's
pipeline: the guided velocity scaled toward the per-image standard deviation of the conditional one) and CFG-Zero*
(`use_cfg_zero_star`, Fan et al. 2025: the unconditional velocity scaled by its optimal projection on the conditional
one). Off (the default without stored defaults) is plain classifier-free guidance; bad values are refused naming the
argument."""

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
    guidance batch and `cond` for the positive one (one image per row of `cond`)."""
    monkeypatch.setattr(pipe, "_velocity", lambda context, **inputs: torch.cat([uncond, cond]))
    stepped = []
    original_step = pipe.scheduler.step

    def step(velocity, *args, **step_kwargs):
        stepped.append(velocity.clone())
        return original_step(velocity, *args, **step_kwargs)

    monkeypatch.setattr(pipe.scheduler, "step", step)
    pipe([PROMPT] * len(cond), num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0),
         **kwargs)
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
    shape = (2, pipe.transformer.in_channels, 8, 8)
    cond = torch.randn(shape, generator=generator) * torch.tensor([0.5, 2.0]).view(2, 1, 1, 1)
    uncond = 3 * torch.randn(shape, generator=generator)
    (velocity, _) = stepped_velocities(pipe, monkeypatch, cond, uncond, guidance_scale=5.0, guidance_rescale=1.0)
    torch.testing.assert_close(velocity.flatten(1).std(dim=1), cond.flatten(1).std(dim=1))


def test_cfg_zero_star_scales_the_unconditional_velocity_by_its_projection(pipe, monkeypatch):
    generator = torch.Generator().manual_seed(4)
    shape = (1, pipe.transformer.in_channels, 8, 8)
    cond = torch.randn(shape, generator=generator)
    uncond = 0.5 * cond + torch.randn(shape, generator=generator)
    stepped = stepped_velocities(pipe, monkeypatch, cond, uncond, guidance_scale=4.0, use_cfg_zero_star=True)
    scale = float((cond.double() * uncond.double()).sum() / (uncond.double() ** 2).sum())
    expected = scale * uncond + 4.0 * (cond - scale * uncond)
    for velocity in stepped:
        torch.testing.assert_close(velocity, expected, rtol=1e-5, atol=1e-5)


def test_cfg_zero_star_then_the_rescale(pipe, monkeypatch):
    generator = torch.Generator().manual_seed(5)
    shape = (1, pipe.transformer.in_channels, 8, 8)
    cond = torch.randn(shape, generator=generator)
    uncond = 2.0 * torch.randn(shape, generator=generator) - cond
    (velocity, _) = stepped_velocities(pipe, monkeypatch, cond, uncond, guidance_scale=4.0, use_cfg_zero_star=True,
                                       guidance_rescale=1.0)
    scale = (cond * uncond).sum() / (uncond**2).sum()
    guided = scale * uncond + 4.0 * (cond - scale * uncond)
    torch.testing.assert_close(velocity, guided * cond.std() / guided.std(), rtol=1e-5, atol=1e-5)


def test_zero_is_plain_classifier_free_guidance(pipe, monkeypatch):
    generator = torch.Generator().manual_seed(3)
    shape = (1, pipe.transformer.in_channels, 8, 8)
    cond, uncond = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    stepped = stepped_velocities(pipe, monkeypatch, cond, uncond, guidance_scale=3.0, guidance_rescale=0.0,
                                 use_cfg_zero_star=False)
    assert all(torch.equal(velocity, uncond + 3.0 * (cond - uncond)) for velocity in stepped)


@pytest.mark.parametrize("option", [{"guidance_rescale": 0.7}, {"use_cfg_zero_star": True}])
def test_off_by_default_and_changes_the_images_when_on(pipe, option):
    plain = sample(pipe, guidance_scale=5.0)
    assert np.array_equal(plain, sample(pipe, guidance_scale=5.0, guidance_rescale=0.0, use_cfg_zero_star=False))
    assert not np.allclose(plain, sample(pipe, guidance_scale=5.0, **option))


def test_no_effect_without_guidance(pipe):
    plain = sample(pipe, guidance_scale=1.0)
    assert np.array_equal(plain, sample(pipe, guidance_scale=1.0, guidance_rescale=0.7, use_cfg_zero_star=True))


@pytest.mark.parametrize("cls", [MMDiTImg2ImgPipeline, MMDiTInpaintPipeline])
def test_image_pipelines_take_it_too(pipe, cls):
    """img2img and inpainting share `MMDiTPipeline`'s guidance step, so the argument acts there as well."""
    other = cls.from_pipe(pipe)
    other.set_progress_bar_config(disable=True)
    image = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
    extra = {"image": image}
    if cls is MMDiTInpaintPipeline:
        extra["mask_image"] = np.ones((16, 16, 1), dtype=np.float32)

    def draw(**kwargs):
        return other(PROMPT, generator=torch.Generator().manual_seed(0), num_inference_steps=4, strength=1.0,
                     guidance_scale=5.0, output_type="np", **extra, **kwargs).images

    assert np.array_equal(draw(), draw(guidance_rescale=0.0, use_cfg_zero_star=False))
    assert not np.allclose(draw(), draw(guidance_rescale=0.7))
    assert not np.allclose(draw(), draw(use_cfg_zero_star=True))
    with pytest.raises(InputError, match="`guidance_rescale`"):
        draw(guidance_rescale=2.0)


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), "0.5", True, [0.5]])
def test_bad_values_are_refused_naming_the_argument(pipe, value):
    with pytest.raises(InputError, match="`guidance_rescale`.*must be a number in \\[0, 1\\]"):
        sample(pipe, guidance_scale=5.0, guidance_rescale=value)


@pytest.mark.parametrize("value", [1, "yes"])
def test_a_use_cfg_zero_star_that_is_not_a_bool_is_refused(pipe, value):
    with pytest.raises(InputError, match="`use_cfg_zero_star` must be True or False"):
        sample(pipe, guidance_scale=5.0, use_cfg_zero_star=value)


def test_a_bad_value_in_a_hand_edited_model_index_is_refused_at_the_call(pipe):
    fresh = MMDiTPipeline(**pipe.components)
    fresh.register_to_config(sampler_defaults={"guidance_rescale": 3})  # as a model_index.json edited by hand
    with pytest.raises(InputError, match="`guidance_rescale`=3 must be a number in"):
        sample(fresh, guidance_scale=5.0)


@pytest.mark.parametrize("stored", [{"guidance_rescale": 1.2}, {"use_cfg_zero_star": "yes"}])
def test_a_bad_stored_default_is_refused(pipe, stored):
    fresh = MMDiTPipeline(**pipe.components)
    with pytest.raises(InputError, match=f"`{next(iter(stored))}`"):
        fresh.register_sampler_defaults(**stored)
