"""The latent space of an `AutoencoderKL`, in one place: its downscaling factor and the normalisation that maps
the VAE's raw latents to the unit-variance space the transformer works in (SD3's convention).

    z = (vae.encode(x) - shift_factor) * scaling_factor        (normalize_latents; encode_images samples and normalises)
    vae.decode(z / scaling_factor + shift_factor)              (denormalize_latents)
"""

from __future__ import annotations

import torch


def vae_scale_factor(vae) -> int:
    """Pixels per latent cell along each side: 2 ** (number of down blocks - 1); 8 when there is no VAE (SD3)."""
    if vae is None:
        return 8
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _shift(vae) -> float:
    return getattr(vae.config, "shift_factor", None) or 0.0


def normalize_latents(z: torch.Tensor, vae) -> torch.Tensor:
    """Raw VAE latents -> the transformer's latent space: (z - shift_factor) * scaling_factor."""
    return (z - _shift(vae)) * vae.config.scaling_factor


def denormalize_latents(z: torch.Tensor, vae) -> torch.Tensor:
    """The transformer's latent space -> raw VAE latents, ready for `vae.decode`."""
    return z / vae.config.scaling_factor + _shift(vae)


def encode_images(images: torch.Tensor, vae, generator=None) -> torch.Tensor:
    """Images [B, 3, H, W] in [-1, 1] -> normalised latents, a sample of the VAE's posterior drawn with `generator`
    (a list: one generator per image, each image encoded on its own), as SD3's img2img and inpainting pipelines."""
    images = images.to(dtype=vae.dtype)
    if isinstance(generator, list):
        raw = torch.cat([vae.encode(images[i : i + 1]).latent_dist.sample(generator[i]) for i in range(len(images))])
    else:
        raw = vae.encode(images).latent_dist.sample(generator)
    return normalize_latents(raw, vae)
