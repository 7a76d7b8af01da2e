"""Rotary position embedding over (text, image) token ids, as FLUX.1.

Every token carries an id of `len(axes_dims)` integers (FLUX: (0, row, col) for an image patch, zeros for text).
Axis `i` rotates its own `axes_dims[i]` features of every query and key head by angles `id_i * theta**(-2j / d_i)`,
so attention scores depend on the ids' differences. The frequencies are diffusers' `FluxPosEmbed` (used as a
library component: it computes them in float64 where the device allows, and returns the `(cos, sin)` pair that
`diffusers.models.embeddings.apply_rotary_emb` and diffusers' FLUX attention processors take).
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_flux import FluxPosEmbed


def image_ids(rows: int, cols: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The ids of a `rows` x `cols` patch grid read row-major: [rows * cols, 3], token (r, c) -> (0, r, c)."""
    grid = torch.cartesian_prod(torch.arange(rows, device=device), torch.arange(cols, device=device))
    return torch.cat([torch.zeros_like(grid[:, :1]), grid], dim=1).float()


def text_ids(length: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The ids of `length` text tokens: all zeros [length, 3] (FLUX gives text no position)."""
    return torch.zeros(length, 3, device=device)


class RotaryPositionEmbedding(FluxPosEmbed):
    """(txt_ids [L, A], img_ids [N, A]) -> (cos, sin), each [L + N, sum(axes_dims)], text first as in the joint
    sequence. No parameters."""

    def __init__(self, theta: float, axes_dims: tuple[int, ...]):
        super().__init__(theta=theta, axes_dim=list(axes_dims))

    def forward(self, txt_ids: torch.Tensor, img_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return super().forward(torch.cat([txt_ids, img_ids], dim=0))
