"""The single-stream block of FLUX.1: text and image tokens as one sequence, attention and MLP side by side.

With x = cat([txt, img]) and `mod` the (shift, scale, gate) that one AdaLN-Zero Linear emits from vec:
    y = mod.modulate(norm(x))
    x = x + mod.gate * proj_out(cat([attention(y), gelu(proj_mlp(y))]))
Q, K, V and the MLP input all read the same `y`; one output projection mixes both branches. The names are
diffusers' FLUX names (`norm.linear`, `attn.to_q` / `to_k` / `to_v` / `norm_q` / `norm_k`, `proj_mlp`,
`proj_out`), so FLUX checkpoints and diffusers-format FLUX LoRAs map onto them unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb

from .attention import make_qk_norm
from .blocks import AdaLNModulation, layer_norm


def text_key_mask(txt_mask: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """txt_mask [B, L] (True = real token) -> the key mask [B, 1, 1, num_tokens] of a joint sequence whose first
    L tokens are the text: padded text keys are masked out, every other key is kept."""
    rest = txt_mask.new_ones(txt_mask.shape[0], num_tokens - txt_mask.shape[1])
    return torch.cat([txt_mask, rest], dim=1)[:, None, None, :]


class SingleStreamAttnProcessor:
    """Self-attention over the joint (text, image) sequence, computed by diffusers' `dispatch_attention_fn` (so
    `set_attention_backend` picks the kernel), with FLUX's rotary embedding and our text padding mask.

    `attention_mask`: the text padding mask [B, L] (True = real token) of the first L tokens. `image_rotary_emb`:
    the `(cos, sin)` pair over the whole sequence (`RotaryPositionEmbedding`). Diffusers' `FluxAttnProcessor` also
    runs on the module, without a text padding mask."""

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn: "SingleStreamAttention",
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key, value = (t.unflatten(-1, (attn.heads, -1)) for t in (query, key, value))  # [B, N, heads, d]
        query, key = attn.norm_q(query), attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        mask = None if attention_mask is None else text_key_mask(attention_mask, hidden_states.shape[1])
        out = dispatch_attention_fn(
            query, key, value, attn_mask=mask, backend=self._attention_backend, parallel_config=self._parallel_config
        )
        return out.flatten(2, 3).to(query.dtype)


class SingleStreamAttention(nn.Module, AttentionModuleMixin):
    """Q, K, V (+ per-head QK-norm) of the single-stream block; no output projection (the block's `proj_out`).

    A diffusers attention module: `set_processor`, `set_attention_backend`, `fuse_projections` work on it, and
    it carries the attributes diffusers' FLUX processors read (`heads`, `head_dim`, `added_kv_proj_dim`)."""

    _default_processor_cls = SingleStreamAttnProcessor
    _available_processors = [SingleStreamAttnProcessor]

    def __init__(self, dim: int, num_heads: int, qk_norm: str | None):
        super().__init__()
        self.heads = num_heads
        self.head_dim = dim // num_heads
        self.inner_dim = dim
        self.use_bias = True  # read by `fuse_projections`
        self.pre_only = True  # no `to_out`, as diffusers' FLUX single-stream attention
        self.added_kv_proj_dim = None  # no separate text projections: the text is part of the sequence
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.norm_q = make_qk_norm(qk_norm, self.head_dim)
        self.norm_k = make_qk_norm(qk_norm, self.head_dim)
        self.set_processor(SingleStreamAttnProcessor())

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        return self.processor(
            self, hidden_states, attention_mask=attention_mask, image_rotary_emb=image_rotary_emb, **kwargs
        )


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
        attn = self.attn(y, attention_mask=attention_mask, image_rotary_emb=image_rotary_emb,
                         **(joint_attention_kwargs or {}))
        mlp = F.gelu(self.proj_mlp(y), approximate="tanh")
        x = x + mod.gate * self.proj_out(torch.cat([attn, mlp], dim=-1))
        if x.dtype == torch.float16:  # as diffusers' FLUX: keep float16 activations finite
            x = x.clip(-65504, 65504)
        return x[:, num_txt:], x[:, :num_txt]
