"""kohya-style SD3 / SD3.5 LoRA files (sd-scripts, ComfyUI, most of civitai) -> diffusers' PEFT-format LoRA keys.

    is_kohya_lora(state_dict)         whether the keys are kohya's (`lora_unet_...`, `lora_te1_...`, `lora_te2_...`)
    kohya_sd3_lora_to_peft(state_dict)  -> {`transformer.<SD3 module>.lora_A.weight`: ..., `text_encoder.<...>`: ...}

A kohya key is `<prefix><module, `_` for `.`>.<lora_down.weight | lora_up.weight | alpha>`: `lora_unet_` the
transformer in Stability AI's original names (`joint_blocks_0_x_block_attn_qkv`, mapped by `conversion.sd3_original`),
`lora_te1_` CLIP-L (`text_encoder`), `lora_te2_` CLIP-G (`text_encoder_2`). kohya computes
`W + up @ down * alpha / rank` (`rank` = down's rows, `alpha` = rank when absent); the factor is folded into up
(PEFT's B), so the adapter loads with scale 1. A fused QKV LoRA (down [R, D], up [3D, R]: sd-scripts' plain and
block-diagonal `split_qkv` forms alike) is exactly three LoRAs with down shared and up's row blocks: Q, K, V.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

from ..errors import SHOWN_KEYS as _SHOWN, InputError
from .sd3_original import original_module_from_underscored, split_original_tensor

TRANSFORMER_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIXES = {"lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
UNSUPPORTED_PREFIXES = {
    "lora_te3_": "T5 (`lora_te3_`): diffusers' SD3 pipelines load LoRAs into the transformer and the two CLIPs only",
    "lora_te_": "a single text encoder (`lora_te_`, an SD 1.x / 2.x LoRA): SD3 has two CLIPs, `lora_te1_` / `lora_te2_`",
}
KOHYA_PREFIXES = (TRANSFORMER_PREFIX, *TEXT_ENCODER_PREFIXES, *UNSUPPORTED_PREFIXES)
_PARTS = ("lora_down.weight", "lora_up.weight", "alpha")
# the modules sd-scripts targets in a CLIP text encoder (CLIPAttention, CLIPMLP), `_` for `.`
_CLIP_MODULE = re.compile(r"^text_model_encoder_layers_(\d+)_(self_attn_(?:q|k|v|out)_proj|mlp_fc[12])$")


def is_kohya_lora(state_dict: Mapping) -> bool:
    return any(key.startswith(KOHYA_PREFIXES) for key in state_dict)


def kohya_sd3_lora_to_peft(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A kohya SD3 / SD3.5 LoRA as diffusers' PEFT-format keys, prefixed by component (`transformer.`,
    `text_encoder.`, `text_encoder_2.`), the transformer's in diffusers' SD3 module names. Raises `InputError`
    naming the keys it cannot convert (unknown modules, T5, LoRA variants other than down / up / alpha)."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unusable = []
    for key, tensor in state_dict.items():
        name, _, part = key.partition(".")
        if part in _PARTS and key.startswith(KOHYA_PREFIXES):
            groups.setdefault(name, {})[part] = tensor
        else:
            unusable.append(key)
    converted = {}
    for name, parts in groups.items():
        target = _target(name)
        if isinstance(target, str) or "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            reason = target if isinstance(target, str) else "needs both lora_down.weight and lora_up.weight"
            unusable.extend(f"{name}.{part} ({reason})" for part in parts)
            continue
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        rank = down.shape[0]
        alpha = float(parts["alpha"]) if "alpha" in parts else rank
        up = up * (alpha / rank)
        component, module = target
        if component == "transformer":
            ups = split_original_tensor(module, up, hidden_size=down.shape[1])
        else:
            ups = {module: up}
        for sd3_module, lora_b in ups.items():
            converted[f"{component}.{sd3_module}.lora_A.weight"] = down
            converted[f"{component}.{sd3_module}.lora_B.weight"] = lora_b
    if unusable:
        raise InputError(
            f"Cannot convert {len(unusable)} of the kohya LoRA file's {len(state_dict)} keys, e.g. "
            f"{sorted(unusable)[:_SHOWN]}. Convertible: `lora_unet_<original SD3 module>` (e.g. "
            "`lora_unet_joint_blocks_0_x_block_attn_qkv`), `lora_te1_` / `lora_te2_` CLIP attention and MLP "
            "modules, each as `.lora_down.weight`, `.lora_up.weight` and an optional `.alpha`."
        )
    return converted


def _target(name: str) -> tuple[str, str] | str:
    """(component, module) that a kohya LoRA name targets, or why it cannot be loaded."""
    for prefix, why in UNSUPPORTED_PREFIXES.items():
        if name.startswith(prefix):
            return why
    if name.startswith(TRANSFORMER_PREFIX):
        module = original_module_from_underscored(name[len(TRANSFORMER_PREFIX):])
        return ("transformer", module) if module else "not a module of the original SD3 / SD3.5 transformer"
    for prefix, component in TEXT_ENCODER_PREFIXES.items():
        if name.startswith(prefix):
            match = _CLIP_MODULE.match(name[len(prefix):])
            if match is None:
                return "not a CLIP attention or MLP module"
            sublayer = match[2].replace("self_attn_", "self_attn.").replace("mlp_", "mlp.")
            return component, f"text_model.encoder.layers.{match[1]}.{sublayer}"
    return "unknown prefix"
