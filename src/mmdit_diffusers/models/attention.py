"""Attention as diffusers does it: a module holding the projections (`MMDiTAttention`, a diffusers `Attention` with
SD3's attribute names) and a processor that computes (`MMDiTAttnProcessor`, through diffusers' attention dispatch).

Joint attention: each stream projects its own Q, K, V (`to_q`... for the image, `add_q_proj`... for the text); one
softmax runs over the concatenated sequence, text first (as FLUX; SD3 puts the image first, which changes nothing
but the order of the summed terms). Any diffusers processor written for SD3's `Attention` runs on the module
(`JointAttnProcessor2_0`, the PAG and IP-Adapter processors, `FusedJointAttnProcessor2_0` after fusing).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, dispatch_attention_fn
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import apply_rotary_emb

from ..errors import InputError
from .fused_ops import (cpu_bf16_attention, cpu_bf16_attention_applies, cpu_bf16_training_attention,
                        cpu_bf16_training_attention_applies, linear)

QK_NORMS = (None, "rms_norm", "layer_norm")

_Backend = AttentionBackendName
# Backends that take our key-padding mask, by the form they read it in (diffusers' attention_dispatch):
# [B, 1, 1, S] bool for PyTorch's SDPA kernels and flex; [B, S] bool for xformers (it adds a 4D mask as a bias);
# [B, S] bool with the kept keys first for the varlen kernels (they attend to key[b, :count]).
_MASK_4D = {_Backend.NATIVE, _Backend._NATIVE_CUDNN, _Backend._NATIVE_EFFICIENT, _Backend._NATIVE_MATH,
            _Backend._NATIVE_NPU, _Backend.FLEX}
_MASK_2D = {_Backend.XFORMERS}
_MASK_PREFIX = {_Backend.FLASH_VARLEN, _Backend.FLASH_VARLEN_HUB, _Backend._FLASH_VARLEN_3,
                _Backend._FLASH_3_VARLEN_HUB, _Backend.SAGE_VARLEN}
MASKED_BACKENDS = frozenset(b.value for b in _MASK_4D | _MASK_2D | _MASK_PREFIX)


def make_qk_norm(kind: str | None, head_dim: int) -> nn.Module | None:
    """Per-head normalisation of queries and keys (SD3.5), with a learned scale; None without (as SD3)."""
    if kind == "rms_norm":
        return nn.RMSNorm(head_dim, eps=1e-6)
    if kind == "layer_norm":
        return nn.LayerNorm(head_dim, eps=1e-6)
    return None


class MMDiTAttention(Attention, AttentionModuleMixin):
    """Multi-head attention with SD3's layout. `joint=True`: the text stream's projections too (`add_q_proj`,
    `add_k_proj`, `add_v_proj`, `norm_added_q`, `norm_added_k`, and `to_add_out` unless `context_pre_only`);
    `joint=False`: image-only self-attention (SD3.5 Medium's `attn2`).

    `fuse_projections()` swaps each stream's three projections for one matmul (`to_qkv`, `to_added_qkv`, diffusers'
    names). Unlike diffusers' attention, the separate layers are removed while fused and checkpoints always hold
    their names (state-dict hooks split and join), so a fused model trains, saves and loads like any other.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: str | None, joint: bool = True,
                 context_pre_only: bool = False, processor=None):
        super().__init__(
            query_dim=dim,
            added_kv_proj_dim=dim if joint else None,
            dim_head=dim // num_heads,
            heads=num_heads,
            out_dim=dim,
            context_pre_only=context_pre_only if joint else None,
            bias=True,
            eps=1e-6,
            processor=processor or MMDiTAttnProcessor(),
        )
        self.head_dim = dim // num_heads
        self.norm_q = make_qk_norm(qk_norm, self.head_dim)
        self.norm_k = make_qk_norm(qk_norm, self.head_dim)
        if joint:
            self.norm_added_q = make_qk_norm(qk_norm, self.head_dim)
            self.norm_added_k = make_qk_norm(qk_norm, self.head_dim)
        self._register_state_dict_hook(_split_fused_state)
        self._register_load_state_dict_pre_hook(_join_unfused_state, with_module=True)

    def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, **cross_attention_kwargs):
        """As diffusers' `Attention.forward`: keyword arguments the processor does not take are dropped with a
        warning. Our own processor is called directly (no signature inspection on every call)."""
        if isinstance(self.processor, MMDiTAttnProcessor) and cross_attention_kwargs.keys() <= {"image_rotary_emb"}:
            return self.processor(self, hidden_states, encoder_hidden_states, attention_mask, **cross_attention_kwargs)
        return super().forward(hidden_states, encoder_hidden_states, attention_mask, **cross_attention_kwargs)

    @torch.no_grad()
    def fuse_projections(self, fuse: bool = True) -> None:
        if not fuse:
            return self.unfuse_projections()
        if self.fused_projections:
            return
        self.to_qkv = _fuse(self, ("to_q", "to_k", "to_v"))
        if self.added_kv_proj_dim is not None:
            self.to_added_qkv = _fuse(self, ("add_q_proj", "add_k_proj", "add_v_proj"))
        self.fused_projections = True

    @torch.no_grad()
    def unfuse_projections(self) -> None:
        if not self.fused_projections:
            return
        _unfuse(self, "to_qkv", ("to_q", "to_k", "to_v"))
        if self.added_kv_proj_dim is not None:
            _unfuse(self, "to_added_qkv", ("add_q_proj", "add_k_proj", "add_v_proj"))
        self.fused_projections = False

    def image_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, N, D] -> q, k, v [B, N, heads, head_dim] through `to_q`, `to_k`, `to_v` (or `to_qkv`), QK-normed."""
        if self.fused_projections:
            qkv = linear(self.to_qkv, x).chunk(3, dim=-1)
        else:
            qkv = (linear(self.to_q, x), linear(self.to_k, x), linear(self.to_v, x))
        return _heads(qkv, self.head_dim, self.norm_q, self.norm_k)

    def text_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The same through the text projections `add_q_proj`, `add_k_proj`, `add_v_proj` (or `to_added_qkv`)."""
        if self.fused_projections:
            qkv = linear(self.to_added_qkv, x).chunk(3, dim=-1)
        else:
            qkv = (linear(self.add_q_proj, x), linear(self.add_k_proj, x), linear(self.add_v_proj, x))
        return _heads(qkv, self.head_dim, self.norm_added_q, self.norm_added_k)


HEADS_FIRST_DEVICES = {"cpu"}  # where the joint sequence is stored heads first (module-level for the tests)


def _join(txt: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
    """Text then image tokens, [B, S, heads, head_dim] -> the joint sequence in the same shape. On the CPU the
    result is stored as [B, heads, S, head_dim] (what its SDPA kernels read fastest); on a GPU it is a plain
    concatenation along the sequence: its kernels take either layout at the same speed, and the strided copy into
    [B, heads, S, head_dim] cost 12% of an SD3-Medium-sized bfloat16 forward on an H200 (benchmarks/README.md)."""
    if img.device.type in HEADS_FIRST_DEVICES:
        return torch.cat([txt.transpose(1, 2), img.transpose(1, 2)], dim=2).transpose(1, 2)
    return torch.cat([txt, img], dim=1)


def _heads(qkv, head_dim: int, norm_q: nn.Module | None, norm_k: nn.Module | None):
    q, k, v = (t.unflatten(-1, (-1, head_dim)) for t in qkv)
    return (q if norm_q is None else norm_q(q)), (k if norm_k is None else norm_k(k)), v


def _fuse(module: nn.Module, names: tuple[str, str, str]) -> nn.Linear:
    parts = [getattr(module, name) for name in names]
    if not all(isinstance(p, nn.Linear) for p in parts):  # PEFT wraps a Linear in a layer that is not one
        raise ValueError("Cannot fuse QKV projections that carry LoRA adapters: fuse or unload the LoRA first.")
    linear = type(parts[0])  # keeps a Linear subclass (mmdit_diffusers.cpu_bf16)
    weight = parts[0].weight
    fused = linear(parts[0].in_features, 3 * parts[0].out_features, device=weight.device, dtype=weight.dtype)
    fused.weight.copy_(torch.cat([p.weight for p in parts]))
    fused.bias.copy_(torch.cat([p.bias for p in parts]))
    fused.requires_grad_(weight.requires_grad)
    for name in names:
        delattr(module, name)
    return fused


def _unfuse(module: nn.Module, fused_name: str, names: tuple[str, str, str]) -> None:
    fused = getattr(module, fused_name)
    for name, weight, bias in zip(names, fused.weight.chunk(3), fused.bias.chunk(3)):
        linear = type(fused)(fused.in_features, weight.shape[0], device=weight.device, dtype=weight.dtype)
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
        linear.requires_grad_(fused.weight.requires_grad)
        setattr(module, name, linear)
    delattr(module, fused_name)


_FUSED_NAMES = {"to_qkv": ("to_q", "to_k", "to_v"), "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}


def _split_fused_state(module, state_dict, prefix, local_metadata):
    if not module.fused_projections:
        return state_dict
    for fused_name, names in _FUSED_NAMES.items():
        for suffix in ("weight", "bias"):
            fused = state_dict.pop(f"{prefix}{fused_name}.{suffix}", None)
            if fused is not None:
                for name, part in zip(names, fused.chunk(3)):
                    state_dict[f"{prefix}{name}.{suffix}"] = part
    return state_dict


def _join_unfused_state(module, state_dict, prefix, *args):
    if not module.fused_projections:
        return
    for fused_name, names in _FUSED_NAMES.items():
        for suffix in ("weight", "bias"):
            keys = [f"{prefix}{name}.{suffix}" for name in names]
            if all(key in state_dict for key in keys):
                state_dict[f"{prefix}{fused_name}.{suffix}"] = torch.cat([state_dict.pop(key) for key in keys])


class MMDiTAttnProcessor:
    """The default processor of `MMDiTAttention`: softmax(q k^T / sqrt(d)) v through diffusers'
    `dispatch_attention_fn`, so `set_attention_backend(...)` picks the kernel.

    `attention_mask` [B, L] bool (True = attend) covers the first L keys: the text tokens of the joint sequence (or of
    a single-stream sequence that starts with them); the other keys are always attended to. It reaches every backend
    that takes a mask (`MASKED_BACKENDS`) in the form that backend reads; the others refuse it with an `InputError`.
    `image_rotary_emb`: the (cos, sin) pair of diffusers' `FluxPosEmbed` over the (text, image) sequence, applied to
    q and k as diffusers' FLUX processor does.

    Returns `(image_out, text_out)` after the output projections for a joint attention (`text_out` unprojected in a
    `context_pre_only` block, as SD3), `image_out` for a self-attention.
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn: MMDiTAttention, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 image_rotary_emb=None, **kwargs):
        query, key, value = attn.image_qkv(hidden_states)
        if encoder_hidden_states is not None:
            txt = attn.text_qkv(encoder_hidden_states)
            query, key, value = (_join(t, i) for t, i in zip(txt, (query, key, value)))
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        if attention_mask is not None:
            key, value, attention_mask = self.key_mask(key, value, attention_mask)
        out = self.attend(query, key, value, attention_mask).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:  # FLUX's single-stream attention (`pre_only`) has no output projection
            return out if attn.pre_only else linear(attn.to_out[0], out)  # to_out[1] is a dropout of probability 0
        num_txt = encoder_hidden_states.shape[1]
        txt_out, img_out = out[:, :num_txt], out[:, num_txt:]
        img_out = linear(attn.to_out[0], img_out)
        return img_out, (txt_out if attn.to_add_out is None else linear(attn.to_add_out, txt_out))

    def attend(self, query, key, value, attn_mask):
        """The attention kernel on [B, S, heads, head_dim] tensors (a subclass may compute it differently): under
        PyTorch's SDPA backend (the default), bfloat16 inference on a CPU with bfloat16 units takes
        `fused_ops.cpu_bf16_attention` where it applies (faster than the CPU flash kernel there; float32 logits
        as that kernel), and bfloat16 training on a CPU with AMX `fused_ops.cpu_bf16_training_attention` (the flash
        kernel's forward, a backward on the bfloat16 tiles), and otherwise diffusers' native backend function itself:
        `dispatch_attention_fn`'s per-call work (~30 us: 1.3% of a `tiny` forward) is for choosing and checking,
        done only where `DIFFUSERS_ATTN_CHECKS` asks for its checks."""
        if self._parallel_config is None and self._backend() == _Backend.NATIVE:
            if cpu_bf16_attention_applies(query, key, value):
                return cpu_bf16_attention(query, key, value, attn_mask)
            if cpu_bf16_training_attention_applies(query, key, value, attn_mask):
                return cpu_bf16_training_attention(query, key, value)
            if not _AttentionBackendRegistry._checks_enabled:  # diffusers' native kernel, without the dispatch
                return _AttentionBackendRegistry._backends[_Backend.NATIVE](query, key, value, attn_mask=attn_mask)
        return dispatch_attention_fn(query, key, value, attn_mask=attn_mask, backend=self._attention_backend,
                                     parallel_config=self._parallel_config)

    def _backend(self) -> AttentionBackendName:
        backend = self._attention_backend or _AttentionBackendRegistry.get_active_backend()[0]
        if not isinstance(backend, AttentionBackendName):  # the enum call is skipped for members, as diffusers does
            backend = AttentionBackendName(backend)
        return backend

    def key_mask(self, key, value, text_mask):
        """(key, value, mask) for the backend: the [B, L] text mask widened to all keys, in that backend's form."""
        backend = self._backend()
        mask = text_mask.bool()
        if mask.shape[1] < key.shape[1]:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], key.shape[1] - mask.shape[1])], dim=1)
        if backend in _MASK_4D:
            return key, value, mask[:, None, None, :]
        if backend in _MASK_2D:
            return key, value, mask
        if backend in _MASK_PREFIX:  # the kept keys first, in order: attention does not depend on the keys' order
            order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)
            index = order[:, :, None, None].expand_as(key)
            return key.gather(1, index), value.gather(1, index), mask.gather(1, order)
        raise InputError(
            f"Attention backend {backend.value!r} takes no attention mask, and this batch needs one: its prompts have "
            f"different text padding (`encoder_attention_mask`). Use a backend that takes masks "
            f"({', '.join(sorted(MASKED_BACKENDS))}), one prompt per batch, or prompts of equal length."
        )


def skip_attention_output(attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
    """What a skipped attention returns (diffusers' LayerSkip with `skip_attention`): its inputs, shaped as the
    processor's output."""
    return hidden_states if encoder_hidden_states is None else (hidden_states, encoder_hidden_states)
