"""A tiny, seeded, offline FLUX.1 pipeline built with diffusers' and transformers' own classes (well under 2 s).

    tiny_flux_components(seed=0, guidance_embeds=True) -> dict of diffusers' FluxPipeline components
    save_tiny_flux_pipeline(path, seed=0, ...)           -> a diffusers-format FLUX.1 folder (FluxPipeline)

As FLUX.1: a `CLIPTextModel` (pooled output only) and a `T5EncoderModel` (the text sequence), an `AutoencoderKL` with
FLUX.1's `scaling_factor` / `shift_factor`, FLUX.1 [dev]'s scheduler config (dynamic shifting) and a
`FluxTransformer2DModel` (patch 1 over 2 x 2-packed latents: in_channels = 4 latent channels x 4), with or without the
guidance embedding. Sizes: VAE scale factor 2, so 16 x 16 px images are 8 x 8 latents and 16 packed tokens; CLIP width
32, T5 width 64. Weights are random, not small (std 0.05), so images depend on the prompt.
"""

from __future__ import annotations

import os

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel

from tiny_pipeline import CLIP_DIM, LATENT_CHANNELS, T5_DIM, _randomize, _seeded, tiny_t5, tiny_tokenizers

FLUX_SCALING_FACTOR, FLUX_SHIFT_FACTOR = 0.3611, 0.1159  # FLUX.1's VAE
# FLUX.1 [dev]'s scheduler_config.json
FLUX_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, shift=3.0,
                      use_dynamic_shifting=True)


def tiny_clip_text_model(vocab_size: int, seed: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=CLIP_DIM,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act="gelu",
        bos_token_id=vocab_size - 2,  # <|startoftext|>, <|endoftext|> are the last two ids
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    with _seeded(seed):
        return CLIPTextModel(config).eval()


def tiny_flux_vae(seed: int) -> AutoencoderKL:
    with _seeded(seed):
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 8),
            layers_per_block=1,
            latent_channels=LATENT_CHANNELS,
            norm_num_groups=4,
            sample_size=32,
            scaling_factor=FLUX_SCALING_FACTOR,
            shift_factor=FLUX_SHIFT_FACTOR,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ).eval()


def tiny_flux_transformer(seed: int, guidance_embeds: bool = True) -> FluxTransformer2DModel:
    with _seeded(seed):
        model = FluxTransformer2DModel(
            patch_size=1,
            in_channels=LATENT_CHANNELS * 4,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=T5_DIM,
            pooled_projection_dim=CLIP_DIM,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=(2, 2, 4),
        )
        return _randomize(model, 0.05)


def tiny_flux_components(seed: int = 0, guidance_embeds: bool = True) -> dict:
    """The components of a tiny diffusers `FluxPipeline`."""
    clip_tokenizer, t5_tokenizer = tiny_tokenizers()
    return dict(
        transformer=tiny_flux_transformer(seed, guidance_embeds),
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        vae=tiny_flux_vae(seed + 1),
        text_encoder=tiny_clip_text_model(len(clip_tokenizer), seed + 2),
        tokenizer=clip_tokenizer,
        text_encoder_2=tiny_t5(len(t5_tokenizer), seed + 3),
        tokenizer_2=t5_tokenizer,
    )


def save_tiny_flux_pipeline(path: str | os.PathLike, seed: int = 0, guidance_embeds: bool = True) -> str:
    """Save a tiny diffusers `FluxPipeline` to `path` (diffusers format: model_index.json + folders)."""
    FluxPipeline(**tiny_flux_components(seed, guidance_embeds)).save_pretrained(path)
    return str(path)
