"""`CleanImageCacheConfig` (mmdit_diffusers.models.clean_image_cache): on a cached step the transformer does not run
and the velocity points from the step's own input to the clean image predicted from the computed steps, so that
diffusers' flow-matching scheduler (stochastic or not) steps toward that clean image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.hooks import FirstBlockCacheConfig

from mmdit_diffusers import CleanImageCacheConfig, MMDiTPipeline, MMDiTTransformer2DModel
from test_cache_hooks import make_inputs, make_pair
from tiny_flux import save_tiny_flux_pipeline
from tiny_pipeline import tiny_mmdit_pipeline

TIMESTEPS = (900.0, 750.0, 600.0, 450.0, 300.0)


def count_calls(model) -> list[int]:
    """Forward calls that reach the output projection (the transformer ran)."""
    calls = [0]
    model.proj_out.register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1))
    return calls


def trajectory(model, context: str = "cond") -> tuple[list[dict], list[torch.Tensor]]:
    """Calls along decreasing timesteps, each with its own latents (as a sampler's fresh noise gives)."""
    inputs = [dict(make_inputs(seed=1), hidden_states=make_inputs(seed=10 + i)["hidden_states"],
                   timestep=torch.full((2,), t)) for i, t in enumerate(TIMESTEPS)]
    outs = []
    with torch.no_grad(), model.cache_context(context):
        for kwargs in inputs:
            outs.append(model(**kwargs).sample)
    return inputs, outs


def clean_image(kwargs: dict, velocity: torch.Tensor) -> torch.Tensor:
    return kwargs["hidden_states"] - kwargs["timestep"].view(-1, 1, 1, 1) / 1000 * velocity


@pytest.fixture
def model() -> MMDiTTransformer2DModel:
    return make_pair()[1]


def test_computed_steps_are_the_plain_model_s_and_skipped_steps_reuse_the_clean_image(model):
    inputs, plain = trajectory(model)
    calls = count_calls(model)
    model.enable_cache(CleanImageCacheConfig(cache_interval=2, disable_cache_before_step=1, max_order=0))
    _, cached = trajectory(model)
    assert calls[0] == 3  # steps 0, 1 and 3 run; 2 and 4 are predicted
    for i in (0, 1, 3):
        assert torch.equal(cached[i], plain[i])
    for i in (2, 4):
        sigma = TIMESTEPS[i] / 1000
        expected = (inputs[i]["hidden_states"] - clean_image(inputs[i - 1], plain[i - 1])) / sigma
        torch.testing.assert_close(cached[i], expected, rtol=1e-5, atol=1e-5)
        assert (cached[i] - plain[i]).abs().max() > 1e-3  # a prediction, not the model


def test_first_order_extrapolates_the_clean_image_linearly_in_sigma(model):
    inputs, plain = trajectory(model)
    model.enable_cache(CleanImageCacheConfig(cache_interval=2, disable_cache_before_step=2, max_order=1))
    _, cached = trajectory(model)
    # steps 0, 1, 2 and 4 run; step 3 extrapolates from steps 1 and 2
    s1, s2, s3 = (t / 1000 for t in TIMESTEPS[1:4])
    x1, x2 = clean_image(inputs[1], plain[1]), clean_image(inputs[2], plain[2])
    predicted = x2 + (x2 - x1) * (s3 - s2) / (s2 - s1)
    torch.testing.assert_close(clean_image(inputs[3], cached[3]), predicted, rtol=1e-4, atol=1e-4)
    assert (predicted - x2).abs().max() > 1e-2  # not the zeroth order
    for i in (0, 1, 2, 4):
        assert torch.equal(cached[i], plain[i])


def test_a_stochastic_scheduler_steps_to_the_cached_clean_image_with_its_fresh_noise(model):
    """What the hook is for: diffusers' stochastic flow-matching step on a cached velocity lands on the cached clean
    image plus this step's noise, however far the step's input moved."""
    inputs, plain = trajectory(model)
    model.enable_cache(CleanImageCacheConfig(cache_interval=2, disable_cache_before_step=1, max_order=0))
    _, cached = trajectory(model)
    scheduler = FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)
    scheduler.set_timesteps(sigmas=[t / 1000 for t in TIMESTEPS] + [0.2], device="cpu")
    sigmas = scheduler.sigmas
    scheduler._step_index = 2
    sample = inputs[2]["hidden_states"]
    stepped = scheduler.step(cached[2], scheduler.timesteps[2], sample,
                             generator=torch.Generator().manual_seed(5)).prev_sample
    noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(5))
    expected = (1 - sigmas[3]) * clean_image(inputs[1], plain[1]) + sigmas[3] * noise
    torch.testing.assert_close(stepped, expected, rtol=1e-4, atol=1e-4)


def test_each_cache_context_and_each_pipeline_call_has_its_own_trajectory(model):
    calls = count_calls(model)
    model.enable_cache(CleanImageCacheConfig(cache_interval=2, disable_cache_before_step=1))
    _, first = trajectory(model, "cond")
    _, other = trajectory(model, "uncond")  # a new context starts at step 0: the same numbers
    assert calls[0] == 6
    for a, b in zip(first, other):
        assert torch.equal(a, b)
    model._reset_stateful_cache()  # what a pipeline call does when it ends
    _, again = trajectory(model, "cond")
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def test_disable_cache_restores_the_plain_model_and_a_second_cache_is_refused(model):
    _, plain = trajectory(model)
    model.enable_cache(CleanImageCacheConfig())
    assert model.is_cache_enabled
    with pytest.raises(ValueError, match="already been enabled"):
        model.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    model.disable_cache()
    assert not model.is_cache_enabled
    calls = count_calls(model)
    _, again = trajectory(model)
    assert calls[0] == len(TIMESTEPS)
    for a, b in zip(plain, again):
        assert torch.equal(a, b)
    model.enable_cache(FirstBlockCacheConfig(threshold=0.1))  # diffusers' own configs still go to diffusers
    model.disable_cache()


def test_the_hook_needs_a_cache_context_and_a_velocity_shaped_like_the_input():
    model = make_pair()[1]
    model.enable_cache(CleanImageCacheConfig())
    with pytest.raises(ValueError, match="cache_context"):
        with torch.no_grad():
            model(**make_inputs())
    other = make_pair(out_channels=8)[1]
    other.enable_cache(CleanImageCacheConfig())
    with pytest.raises(ValueError, match=r"`hidden_states` is \(2, 4, 8, 8\), the output \(2, 8, 8, 8\)"):
        with torch.no_grad(), other.cache_context("cond"):
            other(**make_inputs())


@pytest.mark.parametrize("field, value", [
    ("cache_interval", 0), ("disable_cache_before_step", 0), ("disable_cache_after_step", -1), ("max_order", 2),
    ("num_train_timesteps", 1.5), ("cache_interval", True),
])
def test_impossible_settings_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=f"`{field}`"):
        CleanImageCacheConfig(**{field: value})


def test_from_the_pipeline_with_the_stochastic_sampler():
    pipe = tiny_mmdit_pipeline(seed=0, layout="sd3", masked=True)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, stochastic_sampling=True)
    pipe.set_progress_bar_config(disable=True)
    calls = count_calls(pipe.transformer)

    def images():
        return pipe(["a red circle", "two blue squares"], num_inference_steps=8, guidance_scale=4.0,
                    generator=torch.Generator().manual_seed(0), output_type="np").images

    plain = images()
    assert calls[0] == 8
    pipe.transformer.enable_cache(CleanImageCacheConfig(cache_interval=1))  # every step computed: the same images
    np.testing.assert_allclose(images(), plain, atol=1e-6)
    pipe.transformer.disable_cache()
    pipe.transformer.enable_cache(CleanImageCacheConfig(cache_interval=2, disable_cache_before_step=2))
    calls[0] = 0
    cached = images()
    assert calls[0] == 5  # steps 0, 1, 2, 4, 6
    assert np.isfinite(cached).all() and np.abs(cached - plain).max() > 1e-4
    np.testing.assert_allclose(images(), cached, atol=1e-6)  # each call starts afresh


def test_from_the_flux_pipeline_on_packed_latents(tmp_path):
    """FLUX's latents reach the transformer packed, [B, tokens, channels]: the same rule on that layout."""
    pipe = MMDiTPipeline.from_pretrained(save_tiny_flux_pipeline(tmp_path, guidance_embeds=True))
    pipe.set_progress_bar_config(disable=True)
    calls = count_calls(pipe.transformer)

    def images():
        return pipe(["a red circle", "two blue squares"], num_inference_steps=6, max_sequence_length=16, height=16,
                    width=16, output_type="np", generator=torch.Generator().manual_seed(0)).images

    plain = images()
    pipe.transformer.enable_cache(CleanImageCacheConfig(cache_interval=1))
    np.testing.assert_allclose(images(), plain, atol=1e-6)
    pipe.transformer.disable_cache()
    pipe.transformer.enable_cache(CleanImageCacheConfig(cache_interval=2, disable_cache_before_step=1))
    calls[0] = 0
    cached = images()
    assert calls[0] == 4  # steps 0, 1, 3, 5
    assert np.isfinite(cached).all() and np.abs(cached - plain).max() > 1e-4
