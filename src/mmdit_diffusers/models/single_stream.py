"""The single-stream block of FLUX.1: text and image tokens as one sequence, attention and MLP side by side.

With x = cat([txt, img]) and `mod` the (shift, scale, gate) that one AdaLN-Zero Linear emits from vec:
    y = mod.modulate(norm(x))
    x = x + mod.gate * proj_out(cat([attention(y), gelu(proj_mlp(y))]))
Q, K, V and the MLP input all read the same `y`; one output projection mixes both branches. The names are
diffusers' FLUX names (`norm.linear`, `attn.to_q` / `to_k` / `to_v` / `norm_q` / `norm_k`, `proj_mlp`,
`proj_out`), so FLUX checkpoints and diffusers-format FLUX LoRAs map onto them unchanged.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn as nn
from diffusers.models.attention import AttentionModuleMixin

from .attention import MMDiTAttention, MMDiTAttnProcessor, _join_unfused_state, _split_fused_state, make_qk_norm
from .blocks import AdaLNModulation, layer_norm
from .fused_ops import add_gated, linear, linear_gelu_tanh


class SingleStreamAttention(nn.Module, AttentionModuleMixin):
    """Q, K, V (+ per-head QK-norm) of the single-stream block, over the joint (text, image) sequence; no output
    projection (`pre_only`: the block's `proj_out` follows).

    A diffusers attention module as FLUX's (`AttentionModuleMixin`, not an `attention_processor.Attention`, so
    that diffusers' PAG, which looks for those, leaves it alone): `set_processor`, `set_attention_backend`,
    `fuse_projections` work on it. Its default processor is the double-stream blocks' `MMDiTAttnProcessor`
    (diffusers' attention dispatch, our text padding mask as `attention_mask` over the first tokens, rotary
    embeddings); diffusers' `FluxAttnProcessor` runs on it too (it reads `heads`, `head_dim`, `added_kv_proj_dim`).
    Fused, the three projections are one `to_qkv` and checkpoints keep their names, as in `MMDiTAttention`."""

    _default_processor_cls = MMDiTAttnProcessor
    _available_processors = [MMDiTAttnProcessor]

    def __init__(self, dim: int, num_heads: int, qk_norm: str | None):
        super().__init__()
        self.heads = num_heads
        self.head_dim = dim // num_heads
        self.inner_dim = dim
        self.pre_only = True
        self.added_kv_proj_dim = None  # no separate text projections: the text is part of the sequence
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.norm_q = make_qk_norm(qk_norm, self.head_dim)
        self.norm_k = make_qk_norm(qk_norm, self.head_dim)
        self.set_processor(MMDiTAttnProcessor())
        self._register_state_dict_hook(_split_fused_state)
        self._register_load_state_dict_pre_hook(_join_unfused_state, with_module=True)

    # the double-stream attention's own methods: the image projections are the same layers under the same names
    image_qkv = MMDiTAttention.image_qkv
    fuse_projections = MMDiTAttention.fuse_projections
    unfuse_projections = MMDiTAttention.unfuse_projections

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """`attention_mask` [B, L] bool over the first L (text) tokens; keyword arguments a processor does not take
        are dropped, as diffusers' FLUX attention does."""
        if kwargs and not isinstance(self.processor, MMDiTAttnProcessor):
            accepted = inspect.signature(self.processor.__call__).parameters
            kwargs = {name: value for name, value in kwargs.items() if name in accepted}
        return self.processor(self, hidden_states, None, attention_mask, image_rotary_emb, **kwargs)


class SingleStreamBlock(nn.Module):
    """(img [B, N, D], txt [B, L, D], vec [B, D]) -> (img, txt), the two read and written as one sequence. The
    arguments are those of the double-stream `MMDiTBlock`: `attention_mask` [B, L] bool over the text tokens
    (True = attend), `image_rotary_emb` (cos, sin) over the (text, image) sequence, `joint_attention_kwargs` for
    the attention processor."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qk_norm: str | None):
        super().__init__()
        mlp_hidden = int(dim * mlp_ratio)
        self.norm = AdaLNModulation(dim, ("joint",))
        self.attn = SingleStreamAttention(dim, num_heads, qk_norm)
        self.proj_mlp = nn.Linear(dim, mlp_hidden)
        self.proj_out = nn.Linear(dim + mlp_hidden, dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        num_txt = encoder_hidden_states.shape[1]
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        mod = self.norm(temb)["joint"]
        y = mod.modulate(layer_norm(x))
        attn = self.attn(y, attention_mask, image_rotary_emb, **(joint_attention_kwargs or {}))
        mlp = linear_gelu_tanh(self.proj_mlp, y)
        x = add_gated(x, mod.gate, linear(self.proj_out, torch.cat([attn, mlp], dim=-1)))
        if x.dtype == torch.float16:  # as diffusers' FLUX: keep float16 activations finite
            x = x.clip(-65504, 65504)
        return x[:, num_txt:], x[:, :num_txt]
