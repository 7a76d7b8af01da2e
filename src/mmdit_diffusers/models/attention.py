"""Joint attention: each stream projects its own Q, K, V; one softmax runs over both sequences."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

QK_NORMS = (None, "rms_norm", "layer_norm")


def make_qk_norm(kind: str | None, head_dim: int) -> nn.Module:
    """Per-head normalisation of queries and keys (SD3.5), with a learned scale."""
    if kind == "rms_norm":
        return nn.RMSNorm(head_dim, eps=1e-6)
    if kind == "layer_norm":
        return nn.LayerNorm(head_dim, eps=1e-6)
    return nn.Identity()


class QKVProjection(nn.Module):
    """x [B, N, D] -> q, k, v [B, heads, N, head_dim], with optional QK-norm.

    `fuse()` swaps the three projections for one `to_qkv` matmul. Checkpoints always hold the
    unfused `to_q`/`to_k`/`to_v` names (state-dict hooks split and join), so a fused model saves and
    loads like any other.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: str | None):
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_qkv: nn.Linear | None = None
        self.norm_q = make_qk_norm(qk_norm, dim // num_heads)
        self.norm_k = make_qk_norm(qk_norm, dim // num_heads)
        self._register_state_dict_hook(_split_fused_state)
        self._register_load_state_dict_pre_hook(_join_unfused_state, with_module=True)

    @property
    def is_fused(self) -> bool:
        return self.to_qkv is not None

    @torch.no_grad()
    def fuse(self) -> None:
        if self.is_fused:
            return
        parts = [self.to_q, self.to_k, self.to_v]
        if not all(isinstance(p, nn.Linear) for p in parts):  # PEFT wraps a Linear in a layer that is not one
            raise ValueError("Cannot fuse QKV projections that carry LoRA adapters: fuse or unload the LoRA first.")
        linear = type(parts[0])  # keeps a Linear subclass (mmdit_diffusers.cpu_bf16)
        fused = linear(parts[0].in_features, 3 * parts[0].out_features, device=parts[0].weight.device,
                       dtype=parts[0].weight.dtype)
        fused.weight.copy_(torch.cat([p.weight for p in parts]))
        fused.bias.copy_(torch.cat([p.bias for p in parts]))
        fused.requires_grad_(parts[0].weight.requires_grad)
        del self.to_q, self.to_k, self.to_v
        self.to_qkv = fused

    @torch.no_grad()
    def unfuse(self) -> None:
        if not self.is_fused:
            return
        fused = self.to_qkv
        dim = fused.in_features
        for name, weight, bias in zip(("to_q", "to_k", "to_v"), fused.weight.chunk(3), fused.bias.chunk(3)):
            linear = type(fused)(dim, dim, device=weight.device, dtype=weight.dtype)
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)
            linear.requires_grad_(fused.weight.requires_grad)
            setattr(self, name, linear)
        self.to_qkv = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.to_qkv is not None:
            q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        else:
            q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)) for t in (q, k, v))
        q, k = self.norm_q(q), self.norm_k(k)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def _split_fused_state(module, state_dict, prefix, local_metadata):
    if module.to_qkv is None:
        return state_dict
    for suffix in ("weight", "bias"):
        fused = state_dict.pop(f"{prefix}to_qkv.{suffix}")
        for name, part in zip(("to_q", "to_k", "to_v"), fused.chunk(3)):
            state_dict[f"{prefix}{name}.{suffix}"] = part
    return state_dict


def _join_unfused_state(module, state_dict, prefix, *args):
    if module.to_qkv is None or f"{prefix}to_q.weight" not in state_dict:
        return
    for suffix in ("weight", "bias"):
        parts = [state_dict.pop(f"{prefix}{name}.{suffix}") for name in ("to_q", "to_k", "to_v")]
        state_dict[f"{prefix}to_qkv.{suffix}"] = torch.cat(parts)


class Attention(nn.Module):
    """softmax(q k^T / sqrt(d)) v over [B, heads, N, head_dim]; `key_mask` [B, N] (True = attend) -> [B, N, D].

    No parameters. The kernel is `scaled_dot_product_attention`, PyTorch's, looked up on the module so that a
    model's attention can be computed differently from outside (`mmdit_diffusers.cpu_bf16` replaces it).
    """

    scaled_dot_product_attention = staticmethod(F.scaled_dot_product_attention)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None):
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = self.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).flatten(2)


def joint_attention(attention: Attention, txt_qkv, img_qkv, txt_mask: torch.Tensor | None = None):
    """q = cat([txt_q, img_q]) along the sequence (k, v alike); one `attention`; split back into (txt, img).

    `txt_mask` [B, L] bool: padded text tokens are masked out as keys, so no query sees them.
    """
    q, k, v = (torch.cat([t, i], dim=2) for t, i in zip(txt_qkv, img_qkv))
    key_mask = None
    if txt_mask is not None:
        img_keys = txt_mask.new_ones(txt_mask.shape[0], img_qkv[1].shape[2])
        key_mask = torch.cat([txt_mask, img_keys], dim=1)
    out = attention(q, k, v, key_mask)
    num_txt = txt_qkv[0].shape[2]
    return out[:, :num_txt], out[:, num_txt:]
