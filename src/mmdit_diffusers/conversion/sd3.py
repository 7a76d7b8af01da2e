"""diffusers' SD3 / SD3.5 transformer (`SD3Transformer2DModel`) <-> MMDiT, as functions on configs and state dicts.

    sd3_config_to_mmdit(config)               SD3 config -> MMDiT config (a dict of constructor arguments)
    mmdit_config_to_sd3(config)               MMDiT config -> SD3 config
    sd3_state_dict_to_mmdit(state, config)    SD3 tensors -> MMDiT names and layouts (`config`: the MMDiT config)
    mmdit_state_dict_to_sd3(state, config)    MMDiT tensors -> SD3 names and layouts
    sd3_module_name_to_mmdit(name)            the module-name mapping (the LoRA loader uses it too)
    sd3_tensor_to_mmdit(module, t, config)    the layout change of one tensor of an SD3 module

Every tensor is accounted for: a key that maps nowhere raises with its name. `MMDiTTransformer2DModel.from_sd3`
and `.to_sd3()` build models from these. Three layout differences, exact both ways:
- SD3 embeds patches with a Conv2d; ours is the same map as a Linear on (c, row, col)-flattened patches.
- SD3's pre-only text norm and final norm emit (scale, shift); our modulations emit (shift, scale, ...).
- SD3's `proj_out` rows are ordered (row, col, c); ours (c, row, col), the same as the input tokens.
SD3 also stores its sin-cos position table (`pos_embed.pos_embed`); MMDiT computes it, so it is checked against
the config and dropped on the way in, and computed on the way out.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping

import torch
from diffusers.models.embeddings import get_2d_sincos_pos_embed

TEXT_PREFIX_TOKENS = 77  # CLIP's sequence in front of the T5 tokens in SD3's text sequence
MAX_T5_TOKENS = 512
SD3_POSITION_TABLE = "pos_embed.pos_embed"

# Attention modules carry SD3's names (`attn`, `attn2` and everything in them): identical in both namings.
_JOINT_ATTENTION = ("to_q", "to_k", "to_v", "norm_q", "norm_k", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                    "norm_added_q", "norm_added_k", "to_add_out")
_SELF_ATTENTION = ("to_q", "to_k", "to_v", "norm_q", "norm_k", "to_out.0")
# (SD3 module, our module) for everything inside `transformer_blocks.{i}.`
_BLOCK_RENAMES = [
    ("norm1.linear", "img.modulation.linear"),
    ("norm1_context.linear", "txt.modulation.linear"),
    *((f"attn.{name}", f"attn.{name}") for name in _JOINT_ATTENTION),
    *((f"attn2.{name}", f"attn2.{name}") for name in _SELF_ATTENTION),
    ("ff.net.0.proj", "img.mlp.fc1"),
    ("ff.net.2", "img.mlp.fc2"),
    ("ff_context.net.0.proj", "txt.mlp.fc1"),
    ("ff_context.net.2", "txt.mlp.fc2"),
]
# (SD3 module, our module) outside the blocks
_TOP_RENAMES = [
    ("pos_embed.proj", "x_embedder"),
    ("time_text_embed.timestep_embedder", "timestep_mlp"),
    ("time_text_embed.text_embedder", "pooled_text_mlp"),
    ("context_embedder", "context_embedder"),
    ("norm_out.linear", "norm_out.linear"),
    ("proj_out", "proj_out"),
]
_BLOCK_NAME = re.compile(r"^(transformer_blocks\.\d+\.)(.*)$")


# ---------------------------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------------------------
def _rename(name: str, to_ours: bool) -> str | None:
    """A module (or a parameter inside one) under the other naming; None if it has no counterpart."""
    src, dst = (0, 1) if to_ours else (1, 0)
    match = _BLOCK_NAME.match(name)
    prefix, rest, table = (match[1], match[2], _BLOCK_RENAMES) if match else ("", name, _TOP_RENAMES)
    for pair in table:
        if rest == pair[src] or rest.startswith(pair[src] + "."):
            return prefix + pair[dst] + rest[len(pair[src]) :]
    return None


def sd3_module_name_to_mmdit(name: str) -> str | None:
    """The MMDiT name of the SD3 module (or parameter) `name`, e.g. `transformer_blocks.0.ff_context.net.2` ->
    `transformer_blocks.0.txt.mlp.fc2` (attention modules are named alike); None if MMDiT has no counterpart."""
    return _rename(name, to_ours=True)


def mmdit_module_name_to_sd3(name: str) -> str | None:
    """The inverse of `sd3_module_name_to_mmdit`."""
    return _rename(name, to_ours=False)


def is_sd3_module_name(name: str) -> bool:
    """Whether `name` lies under a module that only SD3's naming has (`norm1`, `ff`, `time_text_embed`, ...).
    `attn`, `attn2`, `context_embedder`, `norm_out.linear` and `proj_out` are named alike in both, so they are not."""
    match = _BLOCK_NAME.match(name)
    rest, table = (match[2], _BLOCK_RENAMES) if match else (name, _TOP_RENAMES)
    sd3_only = {sd3.split(".")[0] for sd3, _ in table} - {ours.split(".")[0] for _, ours in table}
    return rest.split(".")[0] in sd3_only


# ---------------------------------------------------------------------------------------------------------------
# Tensor layouts
# ---------------------------------------------------------------------------------------------------------------
def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(a; b) -> (b; a) along dim 0: SD3's (scale, shift) <-> our (shift, scale)."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _permute_out_rows(t: torch.Tensor, patch_size: int, to_ours: bool) -> torch.Tensor:
    """proj_out rows: SD3 (row, col, c) <-> ours (c, row, col)."""
    p = patch_size
    rest = t.shape[1:]
    if to_ours:
        return t.reshape(p, p, -1, *rest).movedim(2, 0).reshape(-1, *rest)
    return t.reshape(-1, p, p, *rest).movedim(0, 2).reshape(-1, *rest)


def _scale_shift_modules(config: Mapping, to_ours: bool) -> tuple[str, ...]:
    """The modules (in the source naming) whose output is SD3's (scale, shift): the final norm and the pre-only
    text stream's modulation."""
    if not config["txt_pre_only_last_block"]:
        return ("norm_out.linear",)
    last = f"transformer_blocks.{config['depth'] - 1}."
    return ("norm_out.linear", last + ("norm1_context.linear" if to_ours else "txt.modulation.linear"))


def sd3_tensor_to_mmdit(module: str, tensor: torch.Tensor, config: Mapping, output_rows: bool = True) -> torch.Tensor:
    """A tensor of the SD3 module `module` in MMDiT's layout. `config`: the MMDiT config. `output_rows`: dim 0
    indexes the module's outputs (a weight, a bias, a LoRA B, a DoRA magnitude; not a LoRA A, whose rows are its
    rank)."""
    if module == "pos_embed.proj" and tensor.ndim == 4:
        return tensor.reshape(tensor.shape[0], -1)  # conv kernel [D, C, p, p] -> Linear [D, C p p]
    if output_rows and module == "proj_out":
        return _permute_out_rows(tensor, config["patch_size"], to_ours=True)
    if output_rows and module in _scale_shift_modules(config, to_ours=True):
        return _swap_halves(tensor)
    return tensor


def _mmdit_tensor_to_sd3(module: str, tensor: torch.Tensor, config: Mapping) -> torch.Tensor:
    """The inverse of `sd3_tensor_to_mmdit` for weights and biases."""
    p = config["patch_size"]
    if module == "x_embedder" and tensor.ndim == 2:
        return tensor.reshape(tensor.shape[0], -1, p, p)
    if module == "proj_out":
        return _permute_out_rows(tensor, p, to_ours=False)
    if module in _scale_shift_modules(config, to_ours=False):
        return _swap_halves(tensor)
    return tensor


# ---------------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------------
def sd3_config_to_mmdit(config: Mapping) -> dict:
    """An `SD3Transformer2DModel` config -> `MMDiTTransformer2DModel` constructor arguments."""
    cfg = config
    inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    if cfg["caption_projection_dim"] != inner:
        raise ValueError(
            f"SD3 config has caption_projection_dim={cfg['caption_projection_dim']} but the streams are "
            f"num_attention_heads * attention_head_dim = {inner} wide; MMDiT needs them equal."
        )
    if not cfg["pos_embed_max_size"]:
        raise ValueError(
            "SD3 config has pos_embed_max_size=None (positions recomputed for every input size); MMDiT crops a fixed "
            "position grid, as every published SD3 / SD3.5 checkpoint does. Set `pos_embed_max_size`."
        )
    p = cfg["patch_size"]
    return dict(
        img_dim=cfg["in_channels"] * p * p,
        txt_dim=cfg["joint_attention_dim"],
        img_tokens=(cfg["sample_size"] // p) ** 2,
        txt_tokens=TEXT_PREFIX_TOKENS + MAX_T5_TOKENS,
        hidden_size=inner,
        depth=cfg["num_layers"],
        num_heads=cfg["num_attention_heads"],
        mlp_ratio=4,
        cond_dim=cfg["pooled_projection_dim"],
        patch_size=p,
        in_channels=cfg["in_channels"],
        out_channels=cfg["out_channels"] or cfg["in_channels"],
        sample_size=cfg["sample_size"],
        pos_embed_max_size=cfg["pos_embed_max_size"],
        qk_norm=cfg["qk_norm"],
        txt_pre_only_last_block=True,
        dual_attention_layers=tuple(cfg["dual_attention_layers"]),
        use_text_attention_mask=False,
    )


_SIZES_LEFT_TO_DEFAULTS = ("in_channels", "out_channels", "sample_size", "pos_embed_max_size")


def pooled_width(config: Mapping) -> int:
    """The pooled-text width an MMDiT config takes: `cond_dim`, which defaults to `hidden_size`."""
    return config["cond_dim"] or config["hidden_size"]


def _check_sizes_set(config: Mapping) -> None:
    unset = [name for name in _SIZES_LEFT_TO_DEFAULTS if config[name] is None]
    if unset:
        raise ValueError(f"Set {unset} in the MMDiT config (as the model resolves them) to convert it to SD3.")


def mmdit_config_to_sd3(config: Mapping) -> dict:
    """An `MMDiTTransformer2DModel` config -> `SD3Transformer2DModel` constructor arguments.

    `in_channels`, `out_channels`, `sample_size` and `pos_embed_max_size` must be set: a model's config may leave
    them to defaults that the model resolves (`MMDiTTransformer2DModel.to_sd3` passes them resolved)."""
    cfg = config
    required = {"mlp_ratio": 4, "txt_pre_only_last_block": True, "pos_embed_type": "sincos"}
    for name, value in required.items():
        if cfg[name] != value:
            raise ValueError(f"SD3 has no equivalent of `{name}`={cfg[name]!r}; it needs {value!r}.")
    _check_sizes_set(cfg)
    return dict(
        sample_size=cfg["sample_size"],
        patch_size=cfg["patch_size"],
        in_channels=cfg["in_channels"],
        num_layers=cfg["depth"],
        attention_head_dim=cfg["hidden_size"] // cfg["num_heads"],
        num_attention_heads=cfg["num_heads"],
        joint_attention_dim=cfg["txt_dim"],
        caption_projection_dim=cfg["hidden_size"],
        pooled_projection_dim=pooled_width(cfg),
        out_channels=cfg["out_channels"],
        pos_embed_max_size=cfg["pos_embed_max_size"],
        dual_attention_layers=tuple(cfg["dual_attention_layers"]),
        qk_norm=cfg["qk_norm"],
    )


# ---------------------------------------------------------------------------------------------------------------
# State dicts
# ---------------------------------------------------------------------------------------------------------------
def _sd3_position_table(config: Mapping) -> torch.Tensor:
    """SD3's stored sin-cos table [1, max_size**2, D], as `SD3Transformer2DModel` computes it (and MMDiT, cropped)."""
    p = config["patch_size"]
    table = get_2d_sincos_pos_embed(config["hidden_size"], config["pos_embed_max_size"],
                                    base_size=config["sample_size"] // p, interpolation_scale=1.0, output_type="pt")
    return table.float().reshape(1, -1, config["hidden_size"])


def _convert(state_dict: Mapping, rename: Callable, relayout: Callable, source: str) -> dict:
    converted, unmapped = {}, []
    for key, tensor in state_dict.items():
        new = rename(key)
        if new is None:
            unmapped.append(key)
            continue
        converted[new] = relayout(key.rpartition(".")[0], tensor)
    if unmapped:
        raise ValueError(f"Cannot convert {source} tensors with no counterpart: {sorted(unmapped)}")
    return converted


def sd3_state_dict_to_mmdit(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """SD3 weights -> the state dict of the MMDiT with config `config` (e.g. `sd3_config_to_mmdit(sd3.config)`).

    SD3's stored position table, if present, must be the one its config implies (it is not carried over)."""
    state_dict = dict(state_dict)
    table = state_dict.pop(SD3_POSITION_TABLE, None)
    if table is not None:
        expected = _sd3_position_table(config)
        # the stored table is rounded to the checkpoint's dtype (fp16 / bf16 for published weights)
        atol = 1e-5 + torch.finfo(table.dtype).eps
        if expected.shape != table.shape or not torch.allclose(expected.cpu(), table.float().cpu(), atol=atol):
            raise ValueError(f"SD3 `{SD3_POSITION_TABLE}` differs from the sin-cos table its config implies.")
    relayout = lambda module, t: sd3_tensor_to_mmdit(module, t, config)  # noqa: E731
    return _convert(state_dict, sd3_module_name_to_mmdit, relayout, "SD3")


def mmdit_state_dict_to_sd3(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """MMDiT weights (config `config`, resolved as for `mmdit_config_to_sd3`) -> the state dict of the
    `SD3Transformer2DModel` of `mmdit_config_to_sd3(config)`, its position table included (in float32, as SD3)."""
    relayout = lambda module, t: _mmdit_tensor_to_sd3(module, t, config)  # noqa: E731
    converted = _convert(state_dict, mmdit_module_name_to_sd3, relayout, "MMDiT")
    _check_sizes_set(config)
    converted[SD3_POSITION_TABLE] = _sd3_position_table(config)
    return converted
