"""diffusers' FLUX.1 transformer (`FluxTransformer2DModel`) <-> MMDiT, as functions on configs and state dicts.

    flux_config_to_mmdit(config)               FLUX config -> MMDiT config (a dict of constructor arguments)
    mmdit_config_to_flux(config)               MMDiT config -> FLUX config
    flux_state_dict_to_mmdit(state, config)    FLUX tensors -> MMDiT names and layouts (`config`: the MMDiT config)
    mmdit_state_dict_to_flux(state, config)    MMDiT tensors -> FLUX names and layouts
    flux_module_name_to_mmdit(name)            the module-name mapping (LoRA loaders use it too)
    flux_tensor_to_mmdit(module, t, config)    the layout change of one tensor of a FLUX module

Every tensor is accounted for: a key that maps nowhere raises with its name. `MMDiTTransformer2DModel.from_flux`
and `.to_flux()` build models from these. FLUX.1 is an MMDiT with single-stream blocks after the double-stream
ones, rotary positions and (for [dev]) a guidance embedding; the names:
- double-stream blocks are named as SD3's (`norm1`, `attn.add_q_proj`, `ff_context`, ...): the SD3 mapping
  (`conversion.sd3`) renames them (attention modules keep their names); every block keeps its text output (no
  pre-only block), so no tensor changes;
- single-stream blocks carry FLUX's names in MMDiT too: they map onto themselves;
- `time_text_embed.{timestep,guidance,text}_embedder` are `timestep_mlp`, `guidance_mlp`, `pooled_text_mlp`.
One layout difference: FLUX's final norm emits (scale, shift), ours (shift, scale). FLUX's pipeline packs 2 x 2
latent patches with features ordered (c, row, col) before its `patch_size=1` transformer: exactly our `patchify`
with `patch_size=2`, so `x_embedder` and `proj_out` keep their layout and MMDiT takes FLUX latents unpacked.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

from .sd3 import (MAX_T5_TOKENS, _convert, is_sd3_module_name, mmdit_module_name_to_sd3, pooled_width,
                  sd3_module_name_to_mmdit)

FLUX_PATCH = 2  # FLUX.1 pipelines pack 2 x 2 latent patches into one token
FLUX_ROPE_THETA = 10000  # fixed in `FluxTransformer2DModel`
FLUX_IMAGE_TOKENS = 4096  # 1024 x 1024 pixels: 128 x 128 latents, 64 x 64 packed tokens

# (FLUX module, our module) outside the blocks
_TOP_RENAMES = [
    ("x_embedder", "x_embedder"),
    ("time_text_embed.timestep_embedder", "timestep_mlp"),
    ("time_text_embed.guidance_embedder", "guidance_mlp"),
    ("time_text_embed.text_embedder", "pooled_text_mlp"),
    ("context_embedder", "context_embedder"),
    ("norm_out.linear", "norm_out.linear"),
    ("proj_out", "proj_out"),
]
# modules inside `single_transformer_blocks.{i}.`, named alike in both
_SINGLE_BLOCK_MODULES = ("norm.linear", "attn.to_q", "attn.to_k", "attn.to_v", "attn.norm_q", "attn.norm_k",
                         "proj_mlp", "proj_out")
_DOUBLE_BLOCK_NAME = re.compile(r"^transformer_blocks\.\d+\.(.*)$")
_SINGLE_BLOCK_NAME = re.compile(r"^single_transformer_blocks\.\d+\.(.*)$")
_SD3_ONLY_BLOCK_MODULE = "attn2"  # SD3.5 Medium's dual attention: FLUX has none
_SCALE_SHIFT_MODULE = "norm_out.linear"  # named alike in both


# ---------------------------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------------------------
def _under(rest: str, module: str) -> bool:
    return rest == module or rest.startswith(module + ".")


def _rename_top(name: str, to_ours: bool) -> str | None:
    src, dst = (0, 1) if to_ours else (1, 0)
    for pair in _TOP_RENAMES:
        if _under(name, pair[src]):
            return pair[dst] + name[len(pair[src]) :]
    return None


def _rename(name: str, to_ours: bool) -> str | None:
    """A module (or a parameter inside one) under the other naming; None if it has no counterpart."""
    double = _DOUBLE_BLOCK_NAME.match(name)
    if double:
        renamed = (sd3_module_name_to_mmdit if to_ours else mmdit_module_name_to_sd3)(name)
        sd3_name = name if to_ours else renamed
        if renamed is None or _under(_DOUBLE_BLOCK_NAME.match(sd3_name)[1], _SD3_ONLY_BLOCK_MODULE):
            return None
        return renamed
    single = _SINGLE_BLOCK_NAME.match(name)
    if single:
        return name if any(_under(single[1], module) for module in _SINGLE_BLOCK_MODULES) else None
    return _rename_top(name, to_ours)


def flux_module_name_to_mmdit(name: str) -> str | None:
    """The MMDiT name of the FLUX module (or parameter) `name`, e.g. `transformer_blocks.0.ff_context.net.2` ->
    `transformer_blocks.0.txt.mlp.fc2`, `time_text_embed.guidance_embedder` -> `guidance_mlp` (attention modules
    are named alike); None if MMDiT has no counterpart."""
    return _rename(name, to_ours=True)


def mmdit_module_name_to_flux(name: str) -> str | None:
    """The inverse of `flux_module_name_to_mmdit`."""
    return _rename(name, to_ours=False)


def is_flux_module_name(name: str) -> bool:
    """Whether `name` lies under a module that only FLUX's naming has (`time_text_embed`, and in double-stream
    blocks SD3's `norm1`, `ff`, ...). Attention modules, single-stream blocks, `x_embedder`, `context_embedder`,
    `norm_out.linear` and `proj_out` are named alike in both, so they are not."""
    if _DOUBLE_BLOCK_NAME.match(name):
        return is_sd3_module_name(name)
    if _SINGLE_BLOCK_NAME.match(name):
        return False
    flux_only = {flux.split(".")[0] for flux, _ in _TOP_RENAMES} - {ours.split(".")[0] for _, ours in _TOP_RENAMES}
    return name.split(".")[0] in flux_only


# ---------------------------------------------------------------------------------------------------------------
# Tensor layouts
# ---------------------------------------------------------------------------------------------------------------
def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(a; b) -> (b; a) along dim 0: FLUX's (scale, shift) <-> our (shift, scale)."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def flux_tensor_to_mmdit(module: str, tensor: torch.Tensor, config: Mapping, output_rows: bool = True) -> torch.Tensor:
    """A tensor of the FLUX module `module` in MMDiT's layout. `config`: the MMDiT config (kept for the signature
    the SD3 mapping has). `output_rows`: dim 0 indexes the module's outputs (a weight, a bias, a LoRA B, a DoRA
    magnitude; not a LoRA A, whose rows are its rank)."""
    if output_rows and module == _SCALE_SHIFT_MODULE:
        return _swap_halves(tensor)
    return tensor


def _mmdit_tensor_to_flux(module: str, tensor: torch.Tensor) -> torch.Tensor:
    """The inverse of `flux_tensor_to_mmdit` for weights and biases (the swap is its own inverse)."""
    return _swap_halves(tensor) if module == _SCALE_SHIFT_MODULE else tensor


# ---------------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------------
def flux_config_to_mmdit(config: Mapping) -> dict:
    """A `FluxTransformer2DModel` config -> `MMDiTTransformer2DModel` constructor arguments.

    FLUX's `in_channels` / `out_channels` count the features of a packed 2 x 2 patch (64 = 16 latent channels x 4);
    MMDiT counts latent channels with `patch_size=2`, so they are divided by 4 (`img_dim` keeps FLUX's 64).
    `use_text_attention_mask` is False: FLUX was trained attending to padded text, and diffusers passes no mask."""
    cfg = config
    if cfg["patch_size"] != 1:
        raise ValueError(
            f"FLUX config has patch_size={cfg['patch_size']}; FLUX.1 packs 2 x 2 latent patches outside the "
            "transformer and sets patch_size=1, the only value MMDiT converts."
        )
    in_features = cfg["in_channels"]
    out_features = cfg["out_channels"] or in_features
    for name, value in (("in_channels", in_features), ("out_channels", out_features)):
        if value % FLUX_PATCH**2:
            raise ValueError(
                f"FLUX config has {name}={value}, not a multiple of {FLUX_PATCH**2} (the features of a packed "
                f"{FLUX_PATCH} x {FLUX_PATCH} latent patch)."
            )
    heads = cfg["num_attention_heads"]
    return dict(
        img_dim=in_features,
        txt_dim=cfg["joint_attention_dim"],
        img_tokens=FLUX_IMAGE_TOKENS,
        txt_tokens=MAX_T5_TOKENS,
        hidden_size=heads * cfg["attention_head_dim"],
        depth=cfg["num_layers"],
        num_single_layers=cfg["num_single_layers"],
        num_heads=heads,
        mlp_ratio=4,
        cond_dim=cfg["pooled_projection_dim"],
        patch_size=FLUX_PATCH,
        in_channels=in_features // FLUX_PATCH**2,
        out_channels=out_features // FLUX_PATCH**2,
        pos_embed_type="rope",
        axes_dims_rope=tuple(cfg["axes_dims_rope"]),
        rope_theta=FLUX_ROPE_THETA,
        guidance_embeds=bool(cfg["guidance_embeds"]),
        qk_norm="rms_norm",
        txt_pre_only_last_block=False,
        dual_attention_layers=(),
        use_text_attention_mask=False,
    )


def mmdit_config_to_flux(config: Mapping) -> dict:
    """An `MMDiTTransformer2DModel` config -> `FluxTransformer2DModel` constructor arguments (FLUX-style configs
    only: rotary positions, RMS QK-norm, 2 x 2 patches, every block's text output kept)."""
    cfg = config
    required = {"pos_embed_type": "rope", "mlp_ratio": 4, "qk_norm": "rms_norm", "patch_size": FLUX_PATCH,
                "txt_pre_only_last_block": False, "rope_theta": FLUX_ROPE_THETA}
    for name, value in required.items():
        if cfg[name] != value:
            raise ValueError(f"FLUX has no equivalent of `{name}`={cfg[name]!r}; it needs {value!r}.")
    if tuple(cfg["dual_attention_layers"]):
        raise ValueError(
            f"FLUX has no equivalent of `dual_attention_layers`={tuple(cfg['dual_attention_layers'])!r}; it needs ()."
        )
    out_features = cfg["out_channels"] * FLUX_PATCH**2 if cfg["out_channels"] else cfg["img_dim"]
    return dict(
        patch_size=1,
        in_channels=cfg["img_dim"],
        out_channels=None if out_features == cfg["img_dim"] else out_features,
        num_layers=cfg["depth"],
        num_single_layers=cfg["num_single_layers"],
        attention_head_dim=cfg["hidden_size"] // cfg["num_heads"],
        num_attention_heads=cfg["num_heads"],
        joint_attention_dim=cfg["txt_dim"],
        pooled_projection_dim=pooled_width(cfg),
        guidance_embeds=bool(cfg["guidance_embeds"]),
        axes_dims_rope=tuple(cfg["axes_dims_rope"]),
    )


# ---------------------------------------------------------------------------------------------------------------
# State dicts
# ---------------------------------------------------------------------------------------------------------------
def flux_state_dict_to_mmdit(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """FLUX weights -> the state dict of the MMDiT with config `config` (e.g. `flux_config_to_mmdit(flux.config)`)."""
    relayout = lambda module, t: flux_tensor_to_mmdit(module, t, config)  # noqa: E731
    return _convert(state_dict, flux_module_name_to_mmdit, relayout, "FLUX")


def mmdit_state_dict_to_flux(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """MMDiT weights (a FLUX-style config, see `mmdit_config_to_flux`) -> the state dict of the
    `FluxTransformer2DModel` of `mmdit_config_to_flux(config)`."""
    mmdit_config_to_flux(config)
    return _convert(state_dict, mmdit_module_name_to_flux, _mmdit_tensor_to_flux, "MMDiT")
