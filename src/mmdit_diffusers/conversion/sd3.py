"""diffusers' SD3 / SD3.5 transformer <-> MMDiTTransformer2DModel. Every tensor is accounted for: a key
that maps nowhere, or one that is missing, raises with its name.

Three layout differences, exact both ways:
- SD3 embeds patches with a Conv2d; ours is the same map as a Linear on (c, row, col)-flattened patches.
- SD3's pre-only text norm and final norm emit (scale, shift); our modulations emit (shift, scale, ...).
- SD3's `proj_out` rows are ordered (row, col, c); ours (c, row, col), the same as the input tokens.
"""

from __future__ import annotations

import os
import re

import torch

from ..models.transformer_mmdit import MMDiTTransformer2DModel

TEXT_PREFIX_TOKENS = 77  # CLIP's sequence in front of the T5 tokens in SD3's text sequence
MAX_T5_TOKENS = 512

# (SD3 name, our name) for everything inside `transformer_blocks.{i}.`
_BLOCK_RENAMES = [
    ("norm1.linear.", "img.modulation.linear."),
    ("norm1_context.linear.", "txt.modulation.linear."),
    ("attn.to_q.", "img.qkv.to_q."),
    ("attn.to_k.", "img.qkv.to_k."),
    ("attn.to_v.", "img.qkv.to_v."),
    ("attn.norm_q.", "img.qkv.norm_q."),
    ("attn.norm_k.", "img.qkv.norm_k."),
    ("attn.to_out.0.", "img.to_out."),
    ("attn.add_q_proj.", "txt.qkv.to_q."),
    ("attn.add_k_proj.", "txt.qkv.to_k."),
    ("attn.add_v_proj.", "txt.qkv.to_v."),
    ("attn.norm_added_q.", "txt.qkv.norm_q."),
    ("attn.norm_added_k.", "txt.qkv.norm_k."),
    ("attn.to_add_out.", "txt.to_out."),
    ("attn2.to_q.", "img.attn2.qkv.to_q."),
    ("attn2.to_k.", "img.attn2.qkv.to_k."),
    ("attn2.to_v.", "img.attn2.qkv.to_v."),
    ("attn2.norm_q.", "img.attn2.qkv.norm_q."),
    ("attn2.norm_k.", "img.attn2.qkv.norm_k."),
    ("attn2.to_out.0.", "img.attn2.to_out."),
    ("ff.net.0.proj.", "img.mlp.fc1."),
    ("ff.net.2.", "img.mlp.fc2."),
    ("ff_context.net.0.proj.", "txt.mlp.fc1."),
    ("ff_context.net.2.", "txt.mlp.fc2."),
]
_TOP_RENAMES = [
    ("pos_embed.proj.", "x_embedder."),
    ("time_text_embed.timestep_embedder.", "timestep_mlp."),
    ("time_text_embed.text_embedder.", "pooled_text_mlp."),
    ("context_embedder.", "context_embedder."),
    ("norm_out.linear.", "norm_out.linear."),
    ("proj_out.", "proj_out."),
]
_BLOCK_KEY = re.compile(r"^transformer_blocks\.(\d+)\.(.*)$")


def _rename(key: str, to_ours: bool) -> str | None:
    src, dst = (0, 1) if to_ours else (1, 0)
    match = _BLOCK_KEY.match(key)
    prefix, rest, table = (f"transformer_blocks.{match[1]}.", match[2], _BLOCK_RENAMES) if match else ("", key, _TOP_RENAMES)
    for pair in table:
        if rest.startswith(pair[src]):
            return prefix + pair[dst] + rest[len(pair[src]) :]
    return None


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


def sd3_config_to_mmdit(cfg) -> dict:
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


def mmdit_config_to_sd3(model: MMDiTTransformer2DModel) -> dict:
    cfg = model.config
    required = {"mlp_ratio": 4, "txt_pre_only_last_block": True, "pos_embed_type": "sincos"}
    for name, value in required.items():
        if cfg[name] != value:
            raise ValueError(f"SD3 has no equivalent of `{name}`={cfg[name]!r}; it needs {value!r}.")
    return dict(
        sample_size=model.sample_size,
        patch_size=cfg.patch_size,
        in_channels=model.in_channels,
        num_layers=cfg.depth,
        attention_head_dim=cfg.hidden_size // cfg.num_heads,
        num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.txt_dim,
        caption_projection_dim=cfg.hidden_size,
        pooled_projection_dim=cfg.cond_dim or cfg.hidden_size,
        out_channels=model.out_channels,
        pos_embed_max_size=model.pos_grid_size,
        dual_attention_layers=tuple(cfg.dual_attention_layers),
        qk_norm=cfg.qk_norm,
    )


def _convert_state_dict(state_dict: dict, depth: int, patch_size: int, to_ours: bool) -> dict:
    pre_only_txt = f"transformer_blocks.{depth - 1}.{'norm1_context' if to_ours else 'txt.modulation'}.linear."
    converted, unmapped = {}, []
    for key, tensor in state_dict.items():
        new = _rename(key, to_ours)
        if new is None:
            unmapped.append(key)
            continue
        if key.startswith("pos_embed.proj.weight" if to_ours else "x_embedder.weight"):
            tensor = tensor.reshape(tensor.shape[0], -1) if to_ours else tensor.reshape(tensor.shape[0], -1, patch_size, patch_size)
        if key.startswith(("norm_out.linear.", pre_only_txt)):
            tensor = _swap_halves(tensor)
        if key.startswith("proj_out."):
            tensor = _permute_out_rows(tensor, patch_size, to_ours)
        converted[new] = tensor
    if unmapped:
        raise ValueError(f"Cannot convert {'SD3' if to_ours else 'MMDiT'} tensors with no counterpart: {sorted(unmapped)}")
    return converted


def _load_strict(model: torch.nn.Module, state_dict: dict, source: str) -> None:
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ValueError(f"Converted {source} weights do not fit: missing {missing}, unexpected {unexpected}.")
    model.load_state_dict(state_dict, strict=True)


def from_sd3(model_or_path, **from_pretrained_kwargs) -> MMDiTTransformer2DModel:
    """An `SD3Transformer2DModel` (or a diffusers-format folder / repo id holding one) -> MMDiT, same dtype."""
    from diffusers import SD3Transformer2DModel

    if isinstance(model_or_path, (str, os.PathLike)):
        sd3 = SD3Transformer2DModel.from_pretrained(model_or_path, **from_pretrained_kwargs)
    elif isinstance(model_or_path, SD3Transformer2DModel):
        sd3 = model_or_path
    else:
        raise TypeError(f"`model_or_path` must be an SD3Transformer2DModel or a folder path; got {type(model_or_path).__name__}.")
    state = dict(sd3.state_dict())
    sd3_table = state.pop("pos_embed.pos_embed", None)
    model = MMDiTTransformer2DModel(**sd3_config_to_mmdit(sd3.config))
    if sd3_table is not None:
        ours = model.pos_embed.table.reshape(1, -1, model.config.hidden_size)
        # the stored table is rounded to the checkpoint's dtype (fp16 / bf16 for published weights)
        atol = 1e-5 + torch.finfo(sd3_table.dtype).eps
        if ours.shape != sd3_table.shape or not torch.allclose(ours, sd3_table.float().cpu(), atol=atol):
            raise ValueError("SD3 `pos_embed.pos_embed` differs from the sin-cos table its config implies.")
    _load_strict(model, _convert_state_dict(state, model.config.depth, model.config.patch_size, to_ours=True), "SD3")
    return _same_dtype(model, sd3)


def to_sd3(model: MMDiTTransformer2DModel):
    """MMDiT -> diffusers `SD3Transformer2DModel` with the same weights and dtype."""
    from diffusers import SD3Transformer2DModel

    sd3 = SD3Transformer2DModel(**mmdit_config_to_sd3(model))
    state = _convert_state_dict(model.state_dict(), model.config.depth, model.config.patch_size, to_ours=False)
    state["pos_embed.pos_embed"] = sd3.pos_embed.pos_embed
    _load_strict(sd3, state, "MMDiT")
    return _same_dtype(sd3, model)


def _same_dtype(model, like):
    dtype = next(like.parameters()).dtype
    return model if next(model.parameters()).dtype == dtype else model.to(dtype)
