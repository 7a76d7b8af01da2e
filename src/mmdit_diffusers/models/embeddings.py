"""Inputs of the MMDiT: patches, positions, and the conditioning vector.

    vec = timestep_mlp(sinusoidal(t)) + pooled_text_mlp(pooled_text)
        [ + guidance_mlp(sinusoidal(1000 * guidance)) for guidance-distilled models (FLUX.1 [dev]) ]
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.embeddings import get_2d_sincos_pos_embed, get_timestep_embedding


TIMESTEP_CHANNELS = 256  # width of the sinusoidal timestep features, as SD3
GUIDANCE_TO_TIMESTEP = 1000  # FLUX embeds the guidance scale like a timestep in [0, 1000]


def token_grid(num_tokens: int) -> tuple[int, int]:
    """The patch grid (rows, cols) that `num_tokens` tokens are read on, row-major.

    The most square factorisation with rows <= cols: 64 -> (8, 8), 256 -> (16, 16), 128 -> (8, 16).
    """
    rows = max(d for d in range(1, math.isqrt(num_tokens) + 1) if num_tokens % d == 0)
    return rows, num_tokens // rows


def patchify(latents: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)(W/p), C p p]; each token's features ordered (c, row, col) like a Conv2d kernel."""
    b, c, h, w = latents.shape
    p = patch_size
    x = latents.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: torch.Tensor, patch_size: int, height: int, width: int) -> torch.Tensor:
    """Inverse of `patchify`: [B, (H/p)(W/p), C p p] -> [B, C, H, W]."""
    b, _, d = tokens.shape
    p = patch_size
    c = d // (p * p)
    x = tokens.reshape(b, height // p, width // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


class SinCosPositionEmbedding(nn.Module):
    """2D sin-cos positions on a `max_size` x `max_size` patch grid, centre-cropped to the input's grid (SD3).

    The table is computed, not learned, so it is a non-persistent buffer: checkpoints hold weights only.
    """

    def __init__(self, dim: int, max_size: int, base_size: int):
        super().__init__()
        self.max_size = max_size
        table = get_2d_sincos_pos_embed(dim, max_size, base_size=base_size, interpolation_scale=1.0, output_type="pt")
        self.register_buffer("table", table.float().reshape(max_size, max_size, dim), persistent=False)

    def forward(self, rows: int, cols: int) -> torch.Tensor:
        top = (self.max_size - rows) // 2
        left = (self.max_size - cols) // 2
        return self.table[top : top + rows, left : left + cols].reshape(1, rows * cols, -1)


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear: the timestep and pooled-text embedders."""

    def __init__(self, in_dim: int, hidden_size: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden_size)
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


def sinusoidal_timestep(timestep: torch.Tensor) -> torch.Tensor:
    """[B] timesteps in [0, 1000] -> [B, 256] features, (cos, sin) halves as SD3."""
    return get_timestep_embedding(timestep, TIMESTEP_CHANNELS, flip_sin_to_cos=True, downscale_freq_shift=0)


def sinusoidal_guidance(guidance: torch.Tensor) -> torch.Tensor:
    """[B] distilled guidance scales (FLUX.1 [dev]: e.g. 3.5) -> [B, 256]: the timestep features of
    `1000 * guidance`, as diffusers' FLUX (which scales its [0, 1] timestep and the guidance alike; our timestep
    is already in [0, 1000]). An `MLPEmbedder` of its own turns them into a term of `vec`."""
    return sinusoidal_timestep(guidance * GUIDANCE_TO_TIMESTEP)
