"""The double-stream MMDiT block: one `Stream` for the image, one for the text, joined by joint attention (`attn`).

Each stream (AdaLN-Zero), with `attn` and `mlp` the `Modulation`s that Linear(SiLU(temb)) emits:
    x = x + attn.gate * joint_attention(attn.modulate(norm(x)))        (output projections inside the attention)
    x = x + mlp.gate  * mlp(mlp.modulate(norm(x)))
where `modulate(y) = y * (1 + scale) + shift`. Gates start at zero, so a fresh block is the identity. A dual-attention
block (SD3.5 Medium) adds `x = x + attn2.gate * attn2(attn2.modulate(norm(x_in)))`, an image-only self-attention,
between the two, on the same normed input as the joint attention.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.attention import FeedForward as DiffusersFeedForward

from .attention import MMDiTAttention
from .fused_ops import add_gated, linear, linear_gelu_tanh, modulate


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
        return modulate(x, self.scale, self.shift)


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


class FeedForward(DiffusersFeedForward):
    """fc1 -> GELU (tanh) -> fc2. A diffusers `FeedForward` (as SD3's `ff`), so that diffusers' hooks find it
    (LayerSkip's `skip_ff`), with our own layers and names: diffusers' constructor is not run."""

    def __init__(self, dim: int, mlp_ratio: float):
        nn.Module.__init__(self)
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.fc2, linear_gelu_tanh(self.fc1, x))


class Stream(nn.Module):
    """One modality's modulation and MLP. `pre_only`: the stream only feeds keys and values to the joint attention
    and stops (SD3's text stream in the last block): no MLP, ungated attention modulation. `dual_attention`: a
    modulation for the image self-attention `attn2` too (SD3.5 Medium)."""

    def __init__(self, dim: int, mlp_ratio: float, pre_only: bool = False, dual_attention: bool = False):
        super().__init__()
        sublayers = ("attn",) if pre_only else ("attn", "mlp", "attn2") if dual_attention else ("attn", "mlp")
        self.modulation = AdaLNModulation(dim, sublayers, gated=not pre_only)
        if not pre_only:
            self.mlp = FeedForward(dim, mlp_ratio)

    def modulations(self, temb: torch.Tensor) -> StreamModulation:
        return StreamModulation(**self.modulation(temb))

    def update(
        self, x: torch.Tensor, attn_out: torch.Tensor, mod: StreamModulation, attn2_out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`x` plus the gated attention output (and the dual attention's, `attn2_out`), then plus the gated MLP."""
        x = add_gated(x, mod.attn.gate, attn_out)
        if attn2_out is not None:
            x = add_gated(x, mod.attn2.gate, attn2_out)
        return add_gated(x, mod.mlp.gate, self.mlp(mod.mlp.modulate(layer_norm(x))))


class MMDiTBlock(nn.Module):
    """Double-stream block: (hidden_states, encoder_hidden_states) -> the same, image first. A `context_pre_only`
    block (SD3's last) returns its text input unchanged: nothing reads it, and diffusers' cache hooks (First Block
    Cache) take residuals of both outputs. Attention modules as SD3's `JointTransformerBlock`: `attn` (joint) and
    `attn2` (dual attention), diffusers `Attention`s with processors."""

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
        self.context_pre_only = txt_pre_only
        self.img = Stream(dim, mlp_ratio, dual_attention=dual_attention)
        self.txt = Stream(dim, mlp_ratio, pre_only=txt_pre_only)
        self.attn = MMDiTAttention(dim, num_heads, qk_norm, joint=True, context_pre_only=txt_pre_only)
        self.attn2 = MMDiTAttention(dim, num_heads, qk_norm, joint=False) if dual_attention else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`attention_mask` [B, L] bool over the text tokens (True = attend); `image_rotary_emb` (cos, sin) over the
        (text, image) sequence; `joint_attention_kwargs` go to the attention processors, as SD3."""
        kwargs = joint_attention_kwargs or {}
        img_mod, txt_mod = self.img.modulations(temb), self.txt.modulations(temb)
        img_norm = layer_norm(hidden_states)
        rope = {} if image_rotary_emb is None else {"image_rotary_emb": image_rotary_emb}
        img_attn, txt_attn = self.attn(
            img_mod.attn.modulate(img_norm),
            txt_mod.attn.modulate(layer_norm(encoder_hidden_states)),
            attention_mask,
            **rope,
            **kwargs,
        )
        img_attn2 = None if self.attn2 is None else self.attn2(img_mod.attn2.modulate(img_norm), **kwargs)
        hidden_states = self.img.update(hidden_states, img_attn, img_mod, img_attn2)
        if self.context_pre_only:
            return hidden_states, encoder_hidden_states
        return hidden_states, self.txt.update(encoder_hidden_states, txt_attn, txt_mod)
