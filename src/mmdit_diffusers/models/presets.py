"""Named model sizes. The paper's family: hidden = 64 * depth, heads = depth (`paper_preset(depth)`); FLUX.1's
[dev] and [schnell] (the same transformer, [dev] with a guidance embedding)."""

from __future__ import annotations

# SD3-style latent space: 16 channels, patch 2, CLIP-L + CLIP-G + T5-XXL text (4096 / pooled 2048).
_SD3_IO = dict(img_dim=64, txt_dim=4096, cond_dim=2048, patch_size=2, in_channels=16, txt_tokens=589,
               img_tokens=4096, sample_size=128, pos_embed_max_size=192, txt_pre_only_last_block=True)


def paper_preset(depth: int) -> dict:
    """The scaling rule of Esser et al.: width 64 * depth, one head per block of depth."""
    return dict(_SD3_IO, depth=depth, hidden_size=64 * depth, num_heads=depth)


# FLUX.1: 16-channel latents packed 2 x 2, T5-XXL text (4096) and CLIP-L pooled (768); 19 double-stream blocks then
# 38 single-stream ones, rotary positions over (text, image) ids.
_FLUX_1 = dict(img_dim=64, txt_dim=4096, cond_dim=768, patch_size=2, in_channels=16, txt_tokens=512, img_tokens=4096,
               hidden_size=3072, depth=19, num_single_layers=38, num_heads=24, qk_norm="rms_norm",
               pos_embed_type="rope", axes_dims_rope=(16, 56, 56), rope_theta=10000, txt_pre_only_last_block=False)

PRESETS: dict[str, dict] = {
    "tiny": dict(img_dim=16, txt_dim=32, cond_dim=32, img_tokens=16, txt_tokens=16, hidden_size=32, depth=2, num_heads=2),
    "sd3-medium": paper_preset(24),
    "sd3.5-medium": dict(paper_preset(24), pos_embed_max_size=384, qk_norm="rms_norm",
                         dual_attention_layers=tuple(range(13))),
    "sd3.5-large": dict(paper_preset(38), qk_norm="rms_norm"),
    **{f"paper-d{d}": paper_preset(d) for d in (15, 18, 21, 24, 30, 38)},
    "flux.1-dev": dict(_FLUX_1, guidance_embeds=True),
    "flux.1-schnell": dict(_FLUX_1, guidance_embeds=False),
}

RECOMMENDED = dict(img_tokens=64, txt_tokens=32, hidden_size=768, depth=12, num_heads=12, mlp_ratio=4,
                   patch_size=2, qk_norm="rms_norm")
