"""Stability AI's original SD3 / SD3.5 layout (the single-file release: `joint_blocks.N.x_block.attn.qkv`, ...) ->
diffusers' `SD3Transformer2DModel` names, as functions on state dicts; from there `conversion.sd3` goes on to ours.

    strip_original_prefix(checkpoint)            a single file's transformer tensors, `model.diffusion_model.` removed
    original_module_to_sd3(name)                 the one module-name mapping (single files and kohya LoRAs use it)
    original_module_from_underscored(name)       `joint_blocks_0_x_block_attn_qkv` (kohya's spelling) -> dotted
    swaps_scale_shift(name, rows, hidden)        whether a module's output halves are swapped on the way (see below)
    split_original_tensor(name, t, hidden)       one tensor of an original module -> {SD3 module: tensor}
    original_state_dict_to_sd3(state_dict)       original tensors -> SD3 names and layouts
    infer_sd3_config(state_dict, num_heads=None) an `SD3Transformer2DModel` config read off the tensors

Two layout differences, exact both ways: the original fuses each stream's Q, K and V into one `qkv` Linear (SD3 has
`to_q`, `to_k`, `to_v` / `add_q_proj`, ...; their rows stacked in that order), and its final norm and pre-only text
norm emit (shift, scale) where SD3's `AdaLayerNormContinuous` emits (scale, shift).
"""

from __future__ import annotations

import math
import re
from typing import Mapping

import torch

from ..errors import InputError

ORIGINAL_PREFIX = "model.diffusion_model."
POSITION_TABLE = "pos_embed"  # the stored sin-cos table, a parameter of the model itself
SD3_HEAD_DIM = 64  # every released SD3 / SD3.5 model: num_heads = hidden_size / 64 (= depth)
_MARKER = re.compile(r"^joint_blocks\.\d+\.(x_block|context_block)\.")

# (original module inside `joint_blocks.{i}.`, SD3 module(s) inside `transformer_blocks.{i}.`)
_BLOCK_MODULES = {
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "x_block.attn.ln_q": ("attn.norm_q",),
    "x_block.attn.ln_k": ("attn.norm_k",),
    "x_block.attn.proj": ("attn.to_out.0",),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
    "x_block.attn2.ln_q": ("attn2.norm_q",),
    "x_block.attn2.ln_k": ("attn2.norm_k",),
    "x_block.attn2.proj": ("attn2.to_out.0",),
    "x_block.adaLN_modulation.1": ("norm1.linear",),
    "x_block.mlp.fc1": ("ff.net.0.proj",),
    "x_block.mlp.fc2": ("ff.net.2",),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "context_block.attn.ln_q": ("attn.norm_added_q",),
    "context_block.attn.ln_k": ("attn.norm_added_k",),
    "context_block.attn.proj": ("attn.to_add_out",),
    "context_block.adaLN_modulation.1": ("norm1_context.linear",),
    "context_block.mlp.fc1": ("ff_context.net.0.proj",),
    "context_block.mlp.fc2": ("ff_context.net.2",),
}
_TOP_MODULES = {
    "x_embedder.proj": ("pos_embed.proj",),
    "t_embedder.mlp.0": ("time_text_embed.timestep_embedder.linear_1",),
    "t_embedder.mlp.2": ("time_text_embed.timestep_embedder.linear_2",),
    "y_embedder.mlp.0": ("time_text_embed.text_embedder.linear_1",),
    "y_embedder.mlp.2": ("time_text_embed.text_embedder.linear_2",),
    "context_embedder": ("context_embedder",),
    "final_layer.linear": ("proj_out",),
    "final_layer.adaLN_modulation.1": ("norm_out.linear",),
}
_BLOCK = re.compile(r"^joint_blocks\.(\d+)\.(.+)$")
_FINAL_NORM = "final_layer.adaLN_modulation.1"
_TEXT_NORM = "context_block.adaLN_modulation.1"


def is_original_sd3(state_dict: Mapping) -> bool:
    """Whether `state_dict` (prefix stripped) holds an original-layout SD3 / SD3.5 transformer."""
    return any(_MARKER.match(key) for key in state_dict)


def strip_original_prefix(checkpoint: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The transformer's tensors of an original single file: those under `model.diffusion_model.` (a full file also
    holds `text_encoders.*` and `first_stage_model.*`), or all of them when nothing carries the prefix."""
    prefixed = {k[len(ORIGINAL_PREFIX):]: v for k, v in checkpoint.items() if k.startswith(ORIGINAL_PREFIX)}
    return prefixed or dict(checkpoint)


def original_module_to_sd3(name: str) -> tuple[str, ...] | None:
    """The SD3 module(s) of the original module `name`; several when the original stacks their rows (fused QKV).
    None if SD3 has no counterpart. `joint_blocks.3.context_block.attn.qkv` -> (`transformer_blocks.3.attn.add_q_proj`,
    `...add_k_proj`, `...add_v_proj`)."""
    match = _BLOCK.match(name)
    if match is None:
        return _TOP_MODULES.get(name)
    inner = _BLOCK_MODULES.get(match[2])
    return None if inner is None else tuple(f"transformer_blocks.{match[1]}.{m}" for m in inner)


def original_module_from_underscored(name: str) -> str | None:
    """The original module that kohya's `_`-for-`.` spelling names (`joint_blocks_0_x_block_attn_qkv` ->
    `joint_blocks.0.x_block.attn.qkv`); None if it names none."""
    match = re.match(r"^joint_blocks_(\d+)_(.+)$", name)
    table, rest = (_BLOCK_MODULES, match[2]) if match else (_TOP_MODULES, name)
    dotted = next((module for module in table if module.replace(".", "_") == rest), None)
    if dotted is None:
        return None
    return f"joint_blocks.{match[1]}.{dotted}" if match else dotted


def swaps_scale_shift(name: str, output_rows: int, hidden_size: int) -> bool:
    """Whether the module's outputs are (shift, scale) in the original and (scale, shift) in SD3: the final norm,
    and the text stream's norm in the pre-only last block (2 vectors of `hidden_size`, where other blocks have 6)."""
    if name == _FINAL_NORM:
        return True
    return name.endswith(_TEXT_NORM) and output_rows == 2 * hidden_size


def split_original_tensor(name: str, tensor: torch.Tensor, hidden_size: int) -> dict[str, torch.Tensor]:
    """A tensor whose dim 0 indexes the outputs of the original module `name` (a weight, a bias, a LoRA up), as
    the tensors of its SD3 module(s). Row operations only, so GGUF-quantized rows pass through unchanged."""
    targets = original_module_to_sd3(name)
    if targets is None:
        raise InputError(f"The original SD3 module {name!r} has no counterpart in diffusers' SD3 transformer.")
    if swaps_scale_shift(name, tensor.shape[0], hidden_size):
        shift, scale = tensor.chunk(2, dim=0)
        tensor = torch.cat([scale, shift], dim=0)
    parts = tensor.chunk(len(targets), dim=0) if len(targets) > 1 else (tensor,)
    return dict(zip(targets, parts))


def original_state_dict_to_sd3(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original-layout transformer tensors (prefix stripped) -> an `SD3Transformer2DModel` state dict. Every tensor
    is accounted for: keys that map nowhere raise, named."""
    hidden_size = _shape(state_dict, "context_embedder.weight")[0]
    converted, unknown = {}, []
    for key, tensor in state_dict.items():
        if key == POSITION_TABLE:
            converted["pos_embed.pos_embed"] = tensor
            continue
        module, _, param = key.rpartition(".")
        if original_module_to_sd3(module) is None:
            unknown.append(key)
            continue
        for target, part in split_original_tensor(module, tensor, hidden_size).items():
            converted[f"{target}.{param}"] = part
    if unknown:
        raise InputError(f"The checkpoint has original SD3 tensors with no counterpart: {_examples(unknown)}.")
    return converted


def infer_sd3_config(state_dict: Mapping[str, torch.Tensor], num_heads: int | None = None) -> dict:
    """`SD3Transformer2DModel` constructor arguments read off original-layout tensors (prefix stripped).

    Depth, widths, patch size, channels, QK-norm and dual-attention blocks come from the shapes. The head size comes
    from the QK-norm weights where there are any, else from `num_heads`, else it is SD3's 64 (every released SD3 /
    SD3.5 model; a checkpoint without QK-norm does not record it). `sample_size` (the latent size
    the position table is scaled for) is read from the stored table: its second row's first sine / cosine pair is
    the angle `sample_size / patch_size / pos_embed_max_size`."""
    blocks = sorted({int(m[1]) for m in map(_BLOCK.match, state_dict) if m})
    if not blocks:
        raise InputError(f"No `joint_blocks.N.*` tensors: not an original SD3 transformer ({_examples(state_dict)}).")
    hidden_size, joint_dim = _shape(state_dict, "context_embedder.weight")
    patch = _shape(state_dict, "x_embedder.proj.weight")
    if len(patch) != 4:
        raise InputError(f"`x_embedder.proj.weight` has shape {patch}; expected a Conv2d kernel [D, C, p, p].")
    patch_size, in_channels = patch[-1], patch[1]

    qk_norm, head_dim = None, SD3_HEAD_DIM
    if num_heads is not None:
        head_dim = hidden_size // num_heads if num_heads > 0 and hidden_size % num_heads == 0 else 0
    ln_q = state_dict.get("joint_blocks.0.x_block.attn.ln_q.weight")
    if ln_q is not None:
        qk_norm = "layer_norm" if "joint_blocks.0.x_block.attn.ln_q.bias" in state_dict else "rms_norm"
        if num_heads is not None and head_dim != ln_q.shape[0]:
            raise InputError(
                f"`num_heads`={num_heads} does not fit the checkpoint: its QK-norm weights say {ln_q.shape[0]}-wide "
                f"heads, so {hidden_size // ln_q.shape[0]} heads of width {hidden_size}."
            )
        head_dim = ln_q.shape[0]
    if not head_dim or hidden_size % head_dim:
        raise InputError(
            f"Cannot infer the attention heads of a {hidden_size}-wide transformer without QK-norm: "
            + (f"`num_heads`={num_heads} does not divide it." if num_heads is not None else
               f"it is not a multiple of SD3's head size {SD3_HEAD_DIM}.")
            + " Pass `config=` (a folder with the transformer's config.json) or the head count (`num_heads=`)."
        )
    shape = _shape(state_dict, POSITION_TABLE)
    max_size = math.isqrt(shape[1]) if len(shape) == 3 else 0
    if not max_size or max_size**2 != shape[1] or shape[2] != hidden_size:
        raise InputError(f"`{POSITION_TABLE}` has shape {shape}; expected [1, S*S, {hidden_size}].")
    table = state_dict[POSITION_TABLE]
    angle = torch.atan2(table[0, 1, 0].float(), table[0, 1, hidden_size // 4].float()).item()
    return dict(
        sample_size=round(angle * max_size) * patch_size,
        patch_size=patch_size,
        in_channels=in_channels,
        num_layers=blocks[-1] + 1,
        attention_head_dim=head_dim,
        num_attention_heads=hidden_size // head_dim,
        joint_attention_dim=joint_dim,
        caption_projection_dim=hidden_size,
        pooled_projection_dim=_shape(state_dict, "y_embedder.mlp.0.weight")[1],
        out_channels=_shape(state_dict, "final_layer.linear.weight")[0] // patch_size**2,
        pos_embed_max_size=max_size,
        dual_attention_layers=tuple(i for i in blocks if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in state_dict),
        qk_norm=qk_norm,
    )


def _shape(state_dict: Mapping, key: str) -> tuple[int, ...]:
    """A tensor's shape; for a GGUF-quantized one (which holds bytes) the shape it dequantizes to."""
    if key not in state_dict:
        raise InputError(f"The original SD3 checkpoint has no `{key}` ({_examples(state_dict)}).")
    tensor = state_dict[key]
    return tuple(getattr(tensor, "quant_shape", tensor.shape))


def _examples(keys, count: int = 5) -> str:
    """`N keys, e.g. [a, b, ...]`: enough of a long key list to recognise the file."""
    keys = sorted(keys)
    return f"{len(keys)} keys, e.g. {keys[:count]}"
