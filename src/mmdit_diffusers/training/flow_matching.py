r"""The rectified-flow objective of SD3 (Esser et al. 2024, arXiv 2403.03206), minRF-style.

With clean latents x_0, Gaussian noise eps and a noise level sigma in [0, 1]:

    x_t    = (1 - sigma) * x_0 + sigma * eps          (straight path from data at sigma=0 to noise at sigma=1)
    target = d x_t / d sigma = eps - x_0              (the velocity the transformer predicts)
    loss   = mean_b  w(sigma_b) * mean_{c,h,w} (v_theta(x_t, sigma * 1000, text) - target)^2

The transformer gets `timestep = sigma * 1000`, the convention of diffusers' SD3 pipelines and of
`FlowMatchEulerDiscreteScheduler`, so a sampler integrates dx/dsigma = v from sigma=1 down to 0.

sigma is drawn from a density chosen by `weighting_scheme` (diffusers' `compute_density_for_timestep_sampling`):

    logit_normal:  sigma = sigmoid(u), u ~ N(logit_mean, logit_std^2)            (SD3's default: 0, 1)
    mode:          sigma = 1 - u - s * (cos^2(pi*u/2) - 1 + u), u ~ U(0, 1)       (s = mode_scale)
    uniform, sigma_sqrt, cosmap:  sigma ~ U(0, 1)

and the loss weight w(sigma) by `compute_loss_weighting_for_sd3`: sigma^-2 for `sigma_sqrt`,
2 / (pi * (1 - 2 sigma + 2 sigma^2)) for `cosmap`, 1 otherwise (the density already does the weighting).

Higher resolutions keep more signal at a given sigma, so SD3 shifts the noise levels towards noise
(section 5.3.2): sigma' = shift * sigma / (1 + (shift - 1) * sigma), the same map as the scheduler's `shift`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and diffusers are imported where they run: the training CLI's parser reads this module
    import torch

WEIGHTING_SCHEMES = ("logit_normal", "mode", "uniform", "sigma_sqrt", "cosmap", "none")


def sample_sigmas(
    batch_size: int,
    weighting_scheme: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """`batch_size` noise levels sigma in [0, 1] from the scheme's density, then shifted by `shift`."""
    if weighting_scheme not in WEIGHTING_SCHEMES:
        raise ValueError(f"Unknown weighting_scheme {weighting_scheme!r}; expected one of {WEIGHTING_SCHEMES}.")
    from diffusers.training_utils import compute_density_for_timestep_sampling

    sigmas = compute_density_for_timestep_sampling(
        weighting_scheme=weighting_scheme,
        batch_size=batch_size,
        logit_mean=logit_mean,
        logit_std=logit_std,
        mode_scale=mode_scale,
        device=device,
        generator=generator,
    )
    return shift_sigmas(sigmas, shift)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """sigma' = shift * sigma / (1 + (shift - 1) * sigma); `shift=1` returns `sigmas` unchanged."""
    if shift == 1.0:
        return sigmas
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def _expand(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigmas.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - sigma) * x_0 + sigma * noise, with one sigma per batch element."""
    sigma = _expand(sigmas, x0)
    return (1 - sigma) * x0 + sigma * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """target = noise - x_0 (the constant velocity of the straight path)."""
    return noise - x0


def sigmas_to_timesteps(sigmas: torch.Tensor) -> torch.Tensor:
    """timestep = sigma * 1000, as the pipeline and FlowMatchEulerDiscreteScheduler pass it."""
    return sigmas * 1000.0


def loss_weighting(weighting_scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-example loss weight w(sigma) (diffusers' `compute_loss_weighting_for_sd3`)."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    return compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=sigmas)


def flow_matching_loss(pred: torch.Tensor, target: torch.Tensor, weighting: torch.Tensor | None = None) -> torch.Tensor:
    """mean_b w_b * mean_{c,h,w} (pred - target)^2, computed in float32."""
    err = (pred.float() - target.float()) ** 2
    per_example = err.reshape(err.shape[0], -1).mean(dim=1)
    if weighting is not None:
        per_example = weighting.float().reshape(-1) * per_example
    return per_example.mean()
