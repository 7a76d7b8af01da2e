"""The double-stream MMDiT block: one `Stream` for the image, one for the text, joined by joint attention.

Each stream (AdaLN-Zero), with `attn` and `mlp` the `Modulation`s that Linear(SiLU(vec)) emits:
    x = x + attn.gate * to_out(joint_attention(attn.modulate(norm(x))))
    x = x + mlp.gate  * mlp(mlp.modulate(norm(x)))
where `modulate(y) = y * (1 + scale) + shift`. Gates start at zero, so a fresh block is the identity. A dual-attention
image stream (SD3.5 Medium) adds `x = x + attn2.gate * self_attention(attn2.modulate(norm(x_in)))` between the two,
on the same normed input as the joint attention.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import Attention, QKVProjection, joint_attention


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine parameters (the modulation supplies them), eps 1e-6 as SD3."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


class Modulation(NamedTuple):
    """One sub-layer's AdaLN vectors, each [B, 1, D]: its input is `modulate`d, its output scaled by `gate`
    (`None` where nothing is added back: the final norm, a pre-only stream's attention)."""

    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor | None = None

    def modulate(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1 + self.scale) + self.shift


class StreamModulation(NamedTuple):
    """A stream's modulations: attention, MLP, and the image self-attention of a dual-attention block (SD3.5
    Medium). A pre-only stream has `attn` alone, ungated."""

    attn: Modulation
    mlp: Modulation | None = None
    attn2: Modulation | None = None


class AdaLNModulation(nn.Module):
    """vec [B, D] -> {name: `Modulation`} for the named sub-layers, from one zero-initialised Linear (AdaLN-Zero).

    The Linear emits one run of (shift, scale, gate) per sub-layer, or of (shift, scale) when not `gated`, in the
    order of `sublayers`: checkpoints (ours, and SD3's `norm1.linear`) hold that layout.
    """

    def __init__(self, dim: int, sublayers: tuple[str, ...], gated: bool = True):
        super().__init__()
        self.sublayers = tuple(sublayers)
        self.vectors_per_sublayer = 3 if gated else 2
        self.linear = nn.Linear(dim, len(self.sublayers) * self.vectors_per_sublayer * dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, vec: torch.Tensor) -> dict[str, Modulation]:
        n = self.vectors_per_sublayer
        vectors = self.linear(F.silu(vec)).unsqueeze(1).chunk(len(self.sublayers) * n, dim=-1)
        return {name: Modulation(*vectors[i * n : (i + 1) * n]) for i, name in enumerate(self.sublayers)}


class FeedForward(nn.Module):
    """fc1 -> GELU (tanh) -> fc2."""

    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SelfAttention(nn.Module):
    """Image-only self-attention of SD3.5 Medium's dual-attention blocks."""

    def __init__(self, dim: int, num_heads: int, qk_norm: str | None):
        super().__init__()
        self.qkv = QKVProjection(dim, num_heads, qk_norm)
        self.attention = Attention()
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_out(self.attention(*self.qkv(x)))


class Stream(nn.Module):
    """One modality's half of a block. `pre_only`: the stream only feeds keys and values to the joint
    attention and stops (SD3's text stream in the last block). `dual_attention`: an extra image-only
    self-attention after the joint one (SD3.5 Medium), with its own modulation `attn2`."""

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
        sublayers = ("attn",) if pre_only else ("attn", "mlp", "attn2") if dual_attention else ("attn", "mlp")
        self.modulation = AdaLNModulation(dim, sublayers, gated=not pre_only)
        self.qkv = QKVProjection(dim, num_heads, qk_norm)
        if not pre_only:
            self.to_out = nn.Linear(dim, dim)
            self.mlp = FeedForward(dim, mlp_ratio)
        self.attn2 = SelfAttention(dim, num_heads, qk_norm) if dual_attention else None

    def pre_attention(self, x: torch.Tensor, vec: torch.Tensor):
        """Modulate and project. Returns (q, k, v) and what `post_attention` needs."""
        mod = StreamModulation(**self.modulation(vec))
        x_norm = layer_norm(x)
        return self.qkv(mod.attn.modulate(x_norm)), (x_norm, mod)

    def post_attention(self, x: torch.Tensor, attn_out: torch.Tensor, saved) -> torch.Tensor:
        x_norm, mod = saved
        x = x + mod.attn.gate * self.to_out(attn_out)
        if self.attn2 is not None:
            x = x + mod.attn2.gate * self.attn2(mod.attn2.modulate(x_norm))
        return x + mod.mlp.gate * self.mlp(mod.mlp.modulate(layer_norm(x)))


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
        self.attention = Attention()

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, txt_mask: torch.Tensor | None = None):
        img_qkv, img_saved = self.img.pre_attention(img, vec)
        txt_qkv, txt_saved = self.txt.pre_attention(txt, vec)
        txt_attn, img_attn = joint_attention(self.attention, txt_qkv, img_qkv, txt_mask)
        img = self.img.post_attention(img, img_attn, img_saved)
        txt = None if self.txt.pre_only else self.txt.post_attention(txt, txt_attn, txt_saved)
        return img, txt
