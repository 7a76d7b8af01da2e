"""The double-stream MMDiT block: one `Stream` for the image, one for the text, joined by joint attention.

Each stream (AdaLN-Zero):
    shift, scale, gate (attention) and shift, scale, gate (MLP) = Linear(SiLU(vec))
    x = x + gate_attn * to_out(attn(modulate(norm(x), shift_attn, scale_attn)))
    x = x + gate_mlp  * mlp(modulate(norm(x), shift_mlp, scale_mlp))
where attn is the joint attention over both streams' tokens. Gates start at zero, so a fresh
block is the identity.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import QKVProjection, attention, joint_attention
from .cpu_bf16 import Linear


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine parameters (the modulation supplies them), eps 1e-6 as SD3."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class AdaLNModulation(nn.Module):
    """vec [B, D] -> `count` vectors [B, 1, D] (shift, scale, gate, ...), zero-initialised (AdaLN-Zero)."""

    def __init__(self, dim: int, count: int):
        super().__init__()
        self.count = count
        self.linear = Linear(dim, count * dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, vec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(vec)).unsqueeze(1).chunk(self.count, dim=-1)


class FeedForward(nn.Module):
    """fc1 -> GELU (tanh) -> fc2."""

    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SelfAttention(nn.Module):
    """Image-only self-attention of SD3.5 Medium's dual-attention blocks."""

    def __init__(self, dim: int, num_heads: int, qk_norm: str | None):
        super().__init__()
        self.qkv = QKVProjection(dim, num_heads, qk_norm)
        self.to_out = Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_out(attention(*self.qkv(x)))


class Stream(nn.Module):
    """One modality's half of a block. `pre_only`: the stream only feeds keys and values to the joint
    attention and stops (SD3's text stream in the last block). `dual_attention`: an extra image-only
    self-attention after the joint one (SD3.5 Medium), modulated by three more vectors."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        qk_norm: str | None,
        pre_only: bool = False,
        dual_attention: bool = False,
    ):
        super().__init__()
        self.pre_only = pre_only
        self.modulation = AdaLNModulation(dim, 2 if pre_only else 9 if dual_attention else 6)
        self.qkv = QKVProjection(dim, num_heads, qk_norm)
        if not pre_only:
            self.to_out = Linear(dim, dim)
            self.mlp = FeedForward(dim, mlp_ratio)
        self.attn2 = SelfAttention(dim, num_heads, qk_norm) if dual_attention else None

    def pre_attention(self, x: torch.Tensor, vec: torch.Tensor):
        """Modulate and project. Returns (q, k, v) and what `post_attention` needs."""
        mod = self.modulation(vec)
        x_norm = layer_norm(x)
        return self.qkv(modulate(x_norm, mod[0], mod[1])), (x_norm, mod)

    def post_attention(self, x: torch.Tensor, attn_out: torch.Tensor, saved) -> torch.Tensor:
        x_norm, mod = saved
        x = x + mod[2] * self.to_out(attn_out)
        if self.attn2 is not None:
            x = x + mod[8] * self.attn2(modulate(x_norm, mod[6], mod[7]))
        return x + mod[5] * self.mlp(modulate(layer_norm(x), mod[3], mod[4]))


class MMDiTBlock(nn.Module):
    """Double-stream block: (img, txt) -> (img, txt); txt is None after a `txt_pre_only` block."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        qk_norm: str | None,
        txt_pre_only: bool = False,
        dual_attention: bool = False,
    ):
        super().__init__()
        self.img = Stream(dim, num_heads, mlp_ratio, qk_norm, dual_attention=dual_attention)
        self.txt = Stream(dim, num_heads, mlp_ratio, qk_norm, pre_only=txt_pre_only)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, txt_mask: torch.Tensor | None = None):
        img_qkv, img_saved = self.img.pre_attention(img, vec)
        txt_qkv, txt_saved = self.txt.pre_attention(txt, vec)
        txt_attn, img_attn = joint_attention(txt_qkv, img_qkv, txt_mask)
        img = self.img.post_attention(img, img_attn, img_saved)
        txt = None if self.txt.pre_only else self.txt.post_attention(txt, txt_attn, txt_saved)
        return img, txt
