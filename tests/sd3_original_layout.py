"""Write tiny diffusers SD3 models in Stability AI's original single-file layout (the inverse of diffusers' converters,
written here independently of the library's mapping), and kohya-style SD3 LoRA files.

    sd3_to_original(sd3_state_dict)            SD3Transformer2DModel tensors -> `joint_blocks.N.x_block...` names
    vae_to_ldm(vae_state_dict)                 AutoencoderKL tensors -> LDM `encoder.down.N.block.M...` names
    original_pipeline_checkpoint(pipe)         a whole StableDiffusion3Pipeline as one original-layout state dict
    peft_lora_to_kohya(lora, depth)            a diffusers-format SD3 LoRA as the kohya file that encodes it
    tiny_sd3_single_file_pipeline(seed)        a tiny SD3 pipeline whose two CLIPs differ in width (diffusers tells
                                               CLIP-L from CLIP-G in a single file by width)
"""

from __future__ import annotations

import re

import torch
from diffusers import StableDiffusion3Pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from tiny_pipeline import _randomize, _seeded, tiny_scheduler, tiny_tokenizers, tiny_vae

# diffusers SD3 module inside `transformer_blocks.{i}.` -> original module inside `joint_blocks.{i}.`
_BLOCK = {
    "attn.norm_q": "x_block.attn.ln_q",
    "attn.norm_k": "x_block.attn.ln_k",
    "attn.to_out.0": "x_block.attn.proj",
    "attn.norm_added_q": "context_block.attn.ln_q",
    "attn.norm_added_k": "context_block.attn.ln_k",
    "attn.to_add_out": "context_block.attn.proj",
    "attn2.norm_q": "x_block.attn2.ln_q",
    "attn2.norm_k": "x_block.attn2.ln_k",
    "attn2.to_out.0": "x_block.attn2.proj",
    "norm1.linear": "x_block.adaLN_modulation.1",
    "norm1_context.linear": "context_block.adaLN_modulation.1",
    "ff.net.0.proj": "x_block.mlp.fc1",
    "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2",
}
_FUSED = {  # original fused module -> the SD3 modules whose rows it stacks
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
}
_TOP = {
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}


def _swap(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _original_module(sd3_module: str, depth: int) -> tuple[str, bool]:
    """(original module, whether its output halves swap) of an unfused SD3 module."""
    if sd3_module in _TOP:
        return _TOP[sd3_module], sd3_module == "norm_out.linear"
    i, inner = re.match(r"transformer_blocks\.(\d+)\.(.+)$", sd3_module).groups()
    swap = inner == "norm1_context.linear" and int(i) == depth - 1  # the pre-only block's AdaLayerNormContinuous
    return f"joint_blocks.{i}.{_BLOCK[inner]}", swap


def sd3_to_original(state_dict: dict[str, torch.Tensor], prefix: str = "model.diffusion_model.") -> dict:
    """An `SD3Transformer2DModel` state dict as Stability AI's release names and lays it out."""
    depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("transformer_blocks."))
    out = {}
    for key, t in state_dict.items():
        module, _, param = key.rpartition(".")
        if key == "pos_embed.pos_embed":
            out["pos_embed"] = t
            continue
        fused = [(name, parts) for name, parts in _FUSED.items() if module.endswith("." + parts[0])]
        if fused:
            name, parts = fused[0]
            block = module[: -len(parts[0])]
            out[f"joint_blocks.{block.split('.')[1]}.{name}.{param}"] = torch.cat(
                [state_dict[f"{block}{p}.{param}"] for p in parts]
            )
            continue
        if any(module.endswith("." + p) for parts in _FUSED.values() for p in parts[1:]):
            continue  # stacked with its `to_q`
        name, swap = _original_module(module, depth)
        out[f"{name}.{param}"] = _swap(t) if swap else t
    return {prefix + k: v.contiguous() for k, v in out.items()}


def vae_to_ldm(state_dict: dict[str, torch.Tensor], num_blocks: int, prefix: str = "first_stage_model.") -> dict:
    """An `AutoencoderKL` state dict in the LDM layout (`encoder.down.0.block.0.norm1.weight`, 1x1-conv attention)."""
    out = {}
    for key, t in state_dict.items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        up = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.(.*)$", new)
        if up:
            kind = "block." if up[2] == "resnets" else "upsample."
            new = f"decoder.up.{num_blocks - 1 - int(up[1])}.{kind}{up[3]}"
        new = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", new)
        attention = re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", new)
        if attention:
            part = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}[attention[2]]
            new = f"{attention[1]}.mid.attn_1.{part}.{attention[3]}"
            if part != "norm" and t.ndim == 2:
                t = t[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        out[prefix + new] = t.contiguous()
    return out


def original_pipeline_checkpoint(pipe: StableDiffusion3Pipeline) -> dict[str, torch.Tensor]:
    """The whole pipeline as one original-layout state dict, as SD3's `sd3_medium_incl_clips_t5xxlfp16.safetensors`."""
    checkpoint = sd3_to_original(pipe.transformer.state_dict())
    checkpoint.update(vae_to_ldm(pipe.vae.state_dict(), len(pipe.vae.config.down_block_types)))
    encoders = {"clip_l": pipe.text_encoder, "clip_g": pipe.text_encoder_2, "t5xxl": pipe.text_encoder_3}
    for name, encoder in encoders.items():
        if encoder is not None:
            checkpoint.update({f"text_encoders.{name}.transformer.{k}": v.clone().contiguous()
                               for k, v in encoder.state_dict().items()})
    return checkpoint


def peft_lora_to_kohya(lora: dict[str, torch.Tensor], depth: int, alpha_ratio: float = 0.5) -> dict:
    """A diffusers-format SD3 LoRA (`transformer.<SD3 module>.lora_A.weight` / `lora_B`, `text_encoder.` and
    `text_encoder_2.` keys) as the kohya file that encodes it: original module names with `_` for `.`, fused QKV as
    sd-scripts' `split_qkv` saves it (downs stacked, ups block-diagonal), `alpha = alpha_ratio * rank` with the
    ups scaled to match (kohya applies `up @ down * alpha / rank`)."""
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, t in lora.items():
        component, rest = key.split(".", 1)
        module, part = re.match(r"(.+)\.(lora_A|lora_B)\.weight$", rest).groups()
        pairs.setdefault((component, module), {})[part] = t
    out = {}

    def write(name: str, down: torch.Tensor, up: torch.Tensor) -> None:
        rank = down.shape[0]
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = (up / alpha_ratio).contiguous()
        out[f"{name}.alpha"] = torch.tensor(alpha_ratio * rank)

    kohya_prefix = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    for (component, module), ab in pairs.items():
        if component != "transformer":
            write(kohya_prefix[component] + module.replace(".", "_"), ab["lora_A"], ab["lora_B"])
            continue
        fused = [(name, parts) for name, parts in _FUSED.items() if module.endswith("." + parts[0])]
        if fused:
            name, parts = fused[0]
            block = module[: -len(parts[0])]
            members = [pairs[("transformer", block + p)] for p in parts]
            write(f"lora_unet_joint_blocks_{block.split('.')[1]}_{name}".replace(".", "_"),
                  torch.cat([m["lora_A"] for m in members]), torch.block_diag(*[m["lora_B"] for m in members]))
        elif not any(module.endswith("." + p) for parts in _FUSED.values() for p in parts[1:]):
            name, swap = _original_module(module, depth)
            write("lora_unet_" + name.replace(".", "_"), ab["lora_A"], _swap(ab["lora_B"]) if swap else ab["lora_B"])
    return out


def _clip(width: int, vocab_size: int, seed: int) -> CLIPTextModelWithProjection:
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=2, projection_dim=width, max_position_embeddings=77, hidden_act="gelu",
                            bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    with _seeded(seed):
        return CLIPTextModelWithProjection(config).eval()


def tiny_sd3_single_file_pipeline(seed: int = 0, transformer=None) -> StableDiffusion3Pipeline:
    """A tiny SD3 pipeline that a single file can describe: CLIP-L 32 wide, CLIP-G 48 wide (diffusers tells them
    apart by width), CLIP-L's projection the identity (SD3's single files carry none), T5 96 wide."""
    from diffusers import SD3Transformer2DModel

    clip_tokenizer, t5_tokenizer = tiny_tokenizers()
    clip_tokenizer_2, _ = tiny_tokenizers()
    clip_l = _clip(32, len(clip_tokenizer), seed + 2)
    with torch.no_grad():
        clip_l.text_projection.weight.copy_(torch.eye(32))
    t5_config = T5Config(vocab_size=len(t5_tokenizer), d_model=96, d_kv=16, d_ff=64, num_layers=2, num_heads=4,
                         relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                         is_encoder_decoder=False, use_cache=False)
    with _seeded(seed + 4):
        t5 = T5EncoderModel(t5_config).eval()
    if transformer is None:
        with _seeded(seed):
            transformer = _randomize(SD3Transformer2DModel(
                sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=96, caption_projection_dim=32, pooled_projection_dim=80,
                out_channels=4, pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0,),
            ), 0.05)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=tiny_scheduler(), vae=tiny_vae(seed + 1),
        text_encoder=clip_l, tokenizer=clip_tokenizer, text_encoder_2=_clip(48, len(clip_tokenizer), seed + 3),
        tokenizer_2=clip_tokenizer_2, text_encoder_3=t5, tokenizer_3=t5_tokenizer,
        image_encoder=None, feature_extractor=None,
    )
