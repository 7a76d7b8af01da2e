"""MMDiT checkpoints of the first layout (before the attention became diffusers `Attention` modules) -> today's names.

That layout kept each stream's projections in the stream (`transformer_blocks.{i}.img.qkv.to_q`, `....txt.to_out`,
`....img.attn2.qkv.to_q`); today they live in the block's attention modules with SD3's names
(`transformer_blocks.{i}.attn.to_q`, `....attn.to_add_out`, `....attn2.to_q`). Tensors are unchanged; only names
move. `MMDiTTransformer2DModel` applies `legacy_state_dict_to_current` on load (diffusers' `from_pretrained` and
torch's `load_state_dict`), so checkpoints saved before keep loading with identical outputs.

    is_legacy_layout(keys)                   whether any key is in the first layout
    legacy_module_name_to_current(name)      one module (or parameter) name; unchanged if it is not a legacy name
    legacy_state_dict_to_current(state)      every key of a state dict
    current_module_name_to_legacy(name)      the inverse, for tests that write a first-layout checkpoint (not exported)
"""

from __future__ import annotations

import re
from typing import Mapping

# (first layout, today) inside `transformer_blocks.{i}.`
_RENAMES = [
    ("img.qkv.to_q", "attn.to_q"),
    ("img.qkv.to_k", "attn.to_k"),
    ("img.qkv.to_v", "attn.to_v"),
    ("img.qkv.norm_q", "attn.norm_q"),
    ("img.qkv.norm_k", "attn.norm_k"),
    ("img.to_out", "attn.to_out.0"),
    ("txt.qkv.to_q", "attn.add_q_proj"),
    ("txt.qkv.to_k", "attn.add_k_proj"),
    ("txt.qkv.to_v", "attn.add_v_proj"),
    ("txt.qkv.norm_q", "attn.norm_added_q"),
    ("txt.qkv.norm_k", "attn.norm_added_k"),
    ("txt.to_out", "attn.to_add_out"),
    ("img.attn2.qkv.to_q", "attn2.to_q"),
    ("img.attn2.qkv.to_k", "attn2.to_k"),
    ("img.attn2.qkv.to_v", "attn2.to_v"),
    ("img.attn2.qkv.norm_q", "attn2.norm_q"),
    ("img.attn2.qkv.norm_k", "attn2.norm_k"),
    ("img.attn2.to_out", "attn2.to_out.0"),
]
_BLOCK_NAME = re.compile(r"^(.*?transformer_blocks\.\d+\.)(.*)$")


def _rename(name: str, pairs) -> str:
    match = _BLOCK_NAME.match(name)
    if match is None:
        return name
    prefix, rest = match[1], match[2]
    for old, new in pairs:
        if rest == old or rest.startswith(old + "."):
            return prefix + new + rest[len(old) :]
    return name


def legacy_module_name_to_current(name: str) -> str:
    """`...transformer_blocks.0.txt.qkv.to_q.weight` -> `...transformer_blocks.0.attn.add_q_proj.weight`; any other
    name (anything before `transformer_blocks.` is kept, e.g. a LoRA file's `transformer.`) is returned unchanged."""
    return _rename(name, _RENAMES)


def current_module_name_to_legacy(name: str) -> str:
    """The inverse of `legacy_module_name_to_current`."""
    return _rename(name, [(new, old) for old, new in _RENAMES])


def is_legacy_layout(keys) -> bool:
    """Whether any of `keys` (state-dict keys or module names) is a first-layout name."""
    return any(legacy_module_name_to_current(key) != key for key in keys)


def legacy_state_dict_to_current(state_dict: Mapping) -> dict:
    """Every key renamed by `legacy_module_name_to_current`; tensors unchanged."""
    return {legacy_module_name_to_current(key): value for key, value in state_dict.items()}
