"""Random, non-zero PEFT LoRAs on diffusers' and transformers' own models, for LoRA files written by diffusers' own
`save_lora_weights` (tests/test_lora_files.py, tests/test_lora_flux.py, tests/test_lora_flux_pipeline.py).

    peft_lora(model, targets, seed) -> (PEFT state dict of `model`'s LoRA layers, the LoraConfig as a dict)
"""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

from tiny_pipeline import _seeded

CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]  # what kohya trains in a CLIP
# FluxTransformer2DModel's modules, FLUX-only names included (`ff_context.net.2`, `proj_mlp`, `norm1.linear`, the
# guidance embedder), so a file on them is read as a FLUX.1 LoRA and converted
FLUX_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "to_add_out", "ff_context.net.2", "proj_mlp",
                "norm1.linear", "norm.linear", "guidance_embedder.linear_1", "norm_out.linear"]


def peft_lora(model: torch.nn.Module, targets: list[str], seed: int, rank: int = 4, alpha: int = 8):
    """Add a LoRA (rank `rank`, `lora_alpha` `alpha`) on `targets` to `model`, in place, with PEFT's random init
    for both A and B (`init_lora_weights=False`: not zero, so the LoRA changes the outputs); return its PEFT state dict
    and config (the `*_lora_layers` / `*_lora_adapter_metadata` of diffusers' `save_lora_weights`)."""
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    with _seeded(seed):
        inject_adapter_in_model(config, model)  # (transformers' add_adapter wants a newer peft)
    return get_peft_model_state_dict(model), config.to_dict()
