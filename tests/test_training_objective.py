"""The rectified-flow objective (`mmdit_diffusers.training.flow_matching`): sigma densities, the shift, x_t,
the target, the timestep convention and the loss, checked against their formulas. Pure tensor code: fast."""

from __future__ import annotations

import math

import pytest
import torch

from mmdit_diffusers.training.flow_matching import (
    WEIGHTING_SCHEMES,
    flow_matching_loss,
    loss_weighting,
    noisy_latents,
    sample_sigmas,
    shift_sigmas,
    sigmas_to_timesteps,
    velocity_target,
)

N = 200_000


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("mean, std", [(0.0, 1.0), (0.5, 0.6), (-1.0, 1.5)])
def test_logit_normal_sigmas_have_the_requested_logit_mean_and_std(mean, std):
    sigmas = sample_sigmas(N, "logit_normal", logit_mean=mean, logit_std=std, generator=_gen())
    assert sigmas.shape == (N,)
    assert bool(((sigmas > 0) & (sigmas < 1)).all())
    logits = torch.logit(sigmas.double())
    # standard error of the mean is std / sqrt(N) ~ 0.003; of the std ~ std / sqrt(2N)
    assert abs(logits.mean().item() - mean) < 0.02
    assert abs(logits.std().item() - std) < 0.02


def test_uniform_sigmas():
    sigmas = sample_sigmas(N, "uniform", generator=_gen())
    assert abs(sigmas.mean().item() - 0.5) < 0.005
    assert abs(sigmas.var().item() - 1 / 12) < 0.002
    assert sigmas.min().item() >= 0.0 and sigmas.max().item() <= 1.0
    # sigma_sqrt and cosmap sample uniformly too (their weighting is in the loss)
    for scheme in ("sigma_sqrt", "cosmap", "none"):
        assert torch.equal(sample_sigmas(1000, scheme, generator=_gen(3)), sample_sigmas(1000, "uniform", generator=_gen(3)))


@pytest.mark.parametrize("scale", [0.0, 0.8, 1.29])
def test_mode_sigmas_follow_f_mode(scale):
    """sigma = f(u) = 1 - u - s (cos^2(pi u / 2) - 1 + u), u ~ U(0, 1); f decreases, so the q-quantile of
    sigma is f(1 - q)."""
    sigmas = sample_sigmas(N, "mode", mode_scale=scale, generator=_gen())

    def f(u):
        return 1 - u - scale * (math.cos(math.pi * u / 2) ** 2 - 1 + u)

    for q in (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95):
        assert abs(torch.quantile(sigmas, q).item() - f(1 - q)) < 0.01, q
    assert abs(sigmas.mean().item() - 0.5) < 0.005  # E[cos^2(pi u / 2)] = 1/2, so the mean is 1/2 for any s
    if scale > 0:  # more mass in the middle than uniform
        middle = ((sigmas > 0.25) & (sigmas < 0.75)).float().mean().item()
        assert middle > 0.55


def test_sampling_is_reproducible_with_a_generator():
    a = sample_sigmas(64, "logit_normal", generator=_gen(7))
    b = sample_sigmas(64, "logit_normal", generator=_gen(7))
    c = sample_sigmas(64, "logit_normal", generator=_gen(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_unknown_scheme_is_refused():
    with pytest.raises(ValueError, match="weighting_scheme"):
        sample_sigmas(4, "lognormal")
    assert set(WEIGHTING_SCHEMES) >= {"logit_normal", "mode", "uniform"}


def test_resolution_shift_formula():
    sigmas = torch.linspace(0, 1, 101)
    for shift in (0.5, 3.0, 6.0):
        expected = shift * sigmas / (1 + (shift - 1) * sigmas)
        assert torch.equal(shift_sigmas(sigmas, shift), expected)
        assert shift_sigmas(sigmas, shift)[0] == 0 and shift_sigmas(sigmas, shift)[-1] == 1
    assert shift_sigmas(sigmas, 1.0) is sigmas
    assert bool((shift_sigmas(sigmas, 3.0) >= sigmas).all())  # shift > 1 moves towards noise
    # the same map as the scheduler's static shift (FlowMatchEulerDiscreteScheduler: shift*s / (1 + (shift-1)*s))
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    unshifted = torch.arange(1000, 0, -1, dtype=torch.float32) / 1000
    assert torch.allclose(scheduler.sigmas, shift_sigmas(unshifted, 3.0), atol=1e-6)
    # sample_sigmas applies it after drawing
    plain = sample_sigmas(256, "logit_normal", generator=_gen(1))
    assert torch.equal(sample_sigmas(256, "logit_normal", shift=3.0, generator=_gen(1)), shift_sigmas(plain, 3.0))


def test_x_t_target_and_timesteps_follow_the_formulas():
    g = _gen(0)
    x0 = torch.randn(3, 4, 8, 8, generator=g)
    noise = torch.randn(3, 4, 8, 8, generator=g)
    sigmas = torch.tensor([0.0, 0.3, 1.0])
    x_t = noisy_latents(x0, noise, sigmas)
    s = sigmas.view(-1, 1, 1, 1)
    assert torch.equal(x_t, (1 - s) * x0 + s * noise)
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[2], noise[2])  # data at sigma 0, noise at sigma 1
    assert torch.equal(velocity_target(x0, noise), noise - x0)
    # the target is the velocity of the path: x_t(sigma + h) - x_t(sigma) = h * target
    h = 0.25
    diff = noisy_latents(x0, noise, sigmas * 0 + 0.5 + h) - noisy_latents(x0, noise, sigmas * 0 + 0.5)
    assert torch.allclose(diff, h * velocity_target(x0, noise), atol=1e-6)
    assert torch.equal(sigmas_to_timesteps(sigmas), sigmas * 1000)


def test_loss_and_weighting():
    g = _gen(1)
    pred, target = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 2, 3, 3, generator=g)
    sigmas = torch.tensor([0.1, 0.4, 0.6, 0.9])
    per_example = ((pred - target) ** 2).reshape(4, -1).mean(1)
    assert torch.allclose(flow_matching_loss(pred, target), per_example.mean())
    for scheme in ("logit_normal", "mode", "uniform"):
        assert torch.equal(loss_weighting(scheme, sigmas), torch.ones(4))
    assert torch.allclose(loss_weighting("sigma_sqrt", sigmas), sigmas**-2.0)
    cosmap = 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    assert torch.allclose(loss_weighting("cosmap", sigmas), cosmap)
    w = loss_weighting("cosmap", sigmas)
    assert torch.allclose(flow_matching_loss(pred, target, w), (w * per_example).mean())
    # computed in float32 even for half inputs
    assert flow_matching_loss(pred.bfloat16(), target.bfloat16()).dtype == torch.float32
