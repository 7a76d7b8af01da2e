"""Tiny, seeded, offline pipeline components for tests (each build well under 2 s on a CPU).

    tiny_sd3_components(seed=0, with_t5=True)   -> dict of diffusers' StableDiffusion3Pipeline components
    save_tiny_sd3_pipeline(path, seed=0, ...)     -> a diffusers-format SD3 folder (StableDiffusion3Pipeline)
    tiny_mmdit_pipeline(seed=0, layout="sd3", masked=True) -> MMDiTPipeline with a tiny MMDiTTransformer2DModel

Sizes: 16 x 16 px images by default (latents 4 x 8 x 8, patch 2 -> 16 image tokens), VAE scale factor 2,
CLIP width 32 (x2 for SD3's two CLIPs), T5 width 64 (= the transformer's text width), at most 32 T5 tokens for the
MMDiT models (txt_tokens = 77 + 32). Weights are random but not small (std 0.05 .. 0.1), so images depend on
the prompt. Tokenizers are built from `WORDS` with `mmdit_diffusers.shapes.tokenizers` (no download).
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from contextlib import contextmanager

import torch
from PIL import Image, ImageDraw
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from mmdit_diffusers import MMDiTTransformer2DModel
from mmdit_diffusers.pipelines import MMDiTPipeline
from mmdit_diffusers.shapes.tokenizers import build_clip_tokenizer, build_t5_tokenizer

WORDS = (
    "a an the two three one red green blue yellow purple orange black white circle circles square squares "
    "triangle triangles left right of above below on in and with photo picture cat dog"
).split()
LAYOUTS = ("sd3", "clip_t5", "clip")
CLIP_DIM, T5_DIM, LATENT_CHANNELS = 32, 64, 4
T5_TOKENS = 32  # the MMDiT models' text capacity after CLIP's 77 tokens
SAMPLE_SIZE = 8  # latent side -> default image 16 px (VAE scale factor 2)


@contextmanager
def _seeded(seed: int):
    """Seed torch inside the block only; the caller's random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@functools.lru_cache(maxsize=None)
def _tokenizer_dirs() -> tuple[str, str]:
    root = tempfile.mkdtemp(prefix="mmdit-tiny-tokenizers-")
    clip_dir = build_clip_tokenizer(WORDS, os.path.join(root, "clip"), model_max_length=77)
    t5_dir = build_t5_tokenizer(WORDS, os.path.join(root, "t5"), model_max_length=512)
    return clip_dir, t5_dir


def tiny_tokenizers():
    """(CLIPTokenizer, T5TokenizerFast) over `WORDS`; fresh objects each call."""
    clip_dir, t5_dir = _tokenizer_dirs()
    return CLIPTokenizer.from_pretrained(clip_dir), T5TokenizerFast.from_pretrained(t5_dir)


def _randomize(module: torch.nn.Module, std: float) -> torch.nn.Module:
    """Weights and biases ~ N(0, std); normalisation scales keep their init. Uses the current torch seed."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim >= 2 or name.endswith("bias"):
                param.normal_(0.0, std)
    return module.eval()


def tiny_clip(vocab_size: int, seed: int) -> CLIPTextModelWithProjection:
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=CLIP_DIM,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=CLIP_DIM,
        max_position_embeddings=77,
        hidden_act="gelu",
        bos_token_id=vocab_size - 2,  # <|startoftext|>, <|endoftext|> are the last two ids
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    with _seeded(seed):
        return CLIPTextModelWithProjection(config).eval()


def tiny_t5(vocab_size: int, seed: int, width: int = T5_DIM) -> T5EncoderModel:
    config = T5Config(
        vocab_size=vocab_size,
        d_model=width,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
    )
    with _seeded(seed):
        return T5EncoderModel(config).eval()


def tiny_vae(seed: int, latent_channels: int = LATENT_CHANNELS, shift_factor: float | None = 0.0609) -> AutoencoderKL:
    with _seeded(seed):
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 8),
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=4,
            sample_size=32,
            scaling_factor=1.5035,
            shift_factor=shift_factor,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ).eval()


def tiny_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(shift=3.0)


def tiny_sd3_transformer(seed: int, pooled_dim: int = 2 * CLIP_DIM, text_dim: int = T5_DIM,
                         latent_channels: int = LATENT_CHANNELS, in_channels: int | None = None) -> SD3Transformer2DModel:
    """`in_channels` defaults to `latent_channels`; an inpainting transformer takes 2 * latent_channels + 1."""
    with _seeded(seed):
        model = SD3Transformer2DModel(
            sample_size=SAMPLE_SIZE,
            patch_size=2,
            in_channels=in_channels or latent_channels,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=text_dim,
            caption_projection_dim=32,
            pooled_projection_dim=pooled_dim,
            out_channels=latent_channels,
            pos_embed_max_size=16,
        )
        return _randomize(model, 0.05)


def tiny_sd3_components(seed: int = 0, with_t5: bool = True, t5_dim: int = T5_DIM,
                        latent_channels: int = LATENT_CHANNELS, shift_factor: float | None = 0.0609) -> dict:
    """The components of a tiny diffusers `StableDiffusion3Pipeline` (two CLIPs, optionally T5).

    `t5_dim` is also the transformer's text width: 32 (< the two CLIPs' 64) is the layout of diffusers' own SD3
    test components, where SD3 cuts the CLIP states to the T5 width. SD3's inpainting pipeline takes 16 latent
    channels only (`latent_channels=16`)."""
    clip_tokenizer, t5_tokenizer = tiny_tokenizers()
    clip_tokenizer_2, _ = tiny_tokenizers()
    components = dict(
        transformer=tiny_sd3_transformer(seed, text_dim=t5_dim, latent_channels=latent_channels),
        scheduler=tiny_scheduler(),
        vae=tiny_vae(seed + 1, latent_channels, shift_factor),
        text_encoder=tiny_clip(len(clip_tokenizer), seed + 2),
        tokenizer=clip_tokenizer,
        text_encoder_2=tiny_clip(len(clip_tokenizer), seed + 3),
        tokenizer_2=clip_tokenizer_2,
        text_encoder_3=tiny_t5(len(t5_tokenizer), seed + 4, t5_dim) if with_t5 else None,
        tokenizer_3=t5_tokenizer if with_t5 else None,
    )
    return components


def tiny_sd3_pipeline(seed: int = 0, with_t5: bool = True, **layout) -> StableDiffusion3Pipeline:
    """`layout`: `t5_dim`, `latent_channels`, `shift_factor` (see `tiny_sd3_components`)."""
    components = tiny_sd3_components(seed, with_t5, **layout)
    return StableDiffusion3Pipeline(**components, image_encoder=None, feature_extractor=None)


def save_tiny_sd3_pipeline(path: str | os.PathLike, seed: int = 0, with_t5: bool = True, **layout) -> str:
    """Save a tiny diffusers `StableDiffusion3Pipeline` to `path` (diffusers format: model_index.json + folders)."""
    tiny_sd3_pipeline(seed, with_t5, **layout).save_pretrained(path)
    return str(path)


def tiny_mmdit_transformer(seed: int = 0, txt_dim: int = T5_DIM, cond_dim: int = 2 * CLIP_DIM, masked: bool = True):
    with _seeded(seed):
        model = MMDiTTransformer2DModel(
            img_dim=LATENT_CHANNELS * 4,
            txt_dim=txt_dim,
            img_tokens=(SAMPLE_SIZE // 2) ** 2,
            txt_tokens=77 + T5_TOKENS,
            hidden_size=32,
            depth=2,
            num_heads=2,
            cond_dim=cond_dim,
            patch_size=2,
            in_channels=LATENT_CHANNELS,
            pos_embed_max_size=16,
            qk_norm="rms_norm",
            use_text_attention_mask=masked,
        )
        return _randomize(model, 0.1)


def tiny_mmdit_pipeline(seed: int = 0, layout: str = "sd3", masked: bool = True) -> MMDiTPipeline:
    """A tiny `MMDiTPipeline`.

    Args:
        seed: Seeds every component (same seed -> same weights and tokenizers).
        layout: "sd3" (two CLIPs + T5, text width 64, pooled 64), "clip_t5" (one CLIP + T5, width 64, pooled 32)
            or "clip" (one CLIP, width 32, pooled 32; the T5 part of the sequence is masked zeros).
        masked: The transformer's `use_text_attention_mask` (True for models we train).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown layout {layout!r}; expected one of {LAYOUTS}.")
    clip_tokenizer, t5_tokenizer = tiny_tokenizers()
    two_clips, with_t5 = layout == "sd3", layout != "clip"
    txt_dim = T5_DIM if with_t5 else CLIP_DIM
    cond_dim = CLIP_DIM * (2 if two_clips else 1)
    return MMDiTPipeline(
        transformer=tiny_mmdit_transformer(seed, txt_dim, cond_dim, masked),
        scheduler=tiny_scheduler(),
        vae=tiny_vae(seed + 1),
        text_encoder=tiny_clip(len(clip_tokenizer), seed + 2),
        tokenizer=clip_tokenizer,
        text_encoder_2=tiny_clip(len(clip_tokenizer), seed + 3) if two_clips else None,
        tokenizer_2=tiny_tokenizers()[0] if two_clips else None,
        text_encoder_3=tiny_t5(len(t5_tokenizer), seed + 4) if with_t5 else None,
        tokenizer_3=t5_tokenizer if with_t5 else None,
    )


# ---------------------------------------------------------------------------------------------------------------
# A tiny image folder for training
# ---------------------------------------------------------------------------------------------------------------
CAPTIONS = [
    "a red circle", "a blue square", "two green triangles", "a yellow circle left of a cat",
    "a photo of a dog", "three black squares", "a white triangle above a square", "an orange cat",
]
COLORS = [(220, 30, 30), (40, 60, 220), (30, 200, 60), (230, 220, 40), (120, 80, 40), (20, 20, 20), (250, 250, 250),
          (250, 140, 20)]


def write_dataset(root, n: int = 8, size: int = 32, solid: bool = False, column: str = "text") -> str:
    """n images with captions in the imagefolder layout (metadata.jsonl; captions in `column`)."""
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "metadata.jsonl"), "w", encoding="utf-8") as f:
        for i in range(n):
            color = COLORS[i % len(COLORS)]
            image = Image.new("RGB", (size, size), color if solid else (255, 255, 255))
            if not solid:
                ImageDraw.Draw(image).ellipse([4 + i, 6, 4 + i + size // 2, 6 + size // 2], fill=color)
            name = f"{i:04d}.png"
            image.save(os.path.join(root, name))
            f.write(json.dumps({"file_name": name, column: CAPTIONS[i % len(CAPTIONS)]}) + "\n")
    return str(root)
