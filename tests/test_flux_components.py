"""The FLUX.1 pieces of the MMDiT, each against diffusers' own component on the same random weights: rotary
positions and their default ids, the single-stream block (with and without our text padding mask), the guidance
embedding, and the FLUX <-> MMDiT conversion of configs, names and state dicts.

diffusers' modules are built here with weights redrawn from N(0, 0.2) (their init zeroes nothing here, but redrawn
weights make every parameter matter)."""

from __future__ import annotations

import re

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from diffusers.models.attention_dispatch import attention_backend
from diffusers.models.embeddings import CombinedTimestepGuidanceTextProjEmbeddings
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, FluxPosEmbed, FluxSingleTransformerBlock

from mmdit_diffusers.conversion import flux as conversion
from mmdit_diffusers.models.embeddings import MLPEmbedder, sinusoidal_guidance, sinusoidal_timestep
from mmdit_diffusers.models.rope import RotaryPositionEmbedding, image_ids, text_ids
from mmdit_diffusers.models.single_stream import SingleStreamBlock

DIM, HEADS, AXES = 32, 2, (4, 6, 6)  # head_dim 16 = sum(AXES)
TOLERANCE = 1e-5

FLUX_TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=20, guidance_embeds=True,
                 axes_dims_rope=AXES)


def randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0, 0.2)
    return module.eval()


def rope(num_txt: int, rows: int, cols: int):
    return RotaryPositionEmbedding(10000, AXES)(text_ids(num_txt), image_ids(rows, cols))


def single_blocks(seed: int = 0):
    """diffusers' FLUX single-stream block and ours with the same weights (the names are the same)."""
    flux = randomise(FluxSingleTransformerBlock(DIM, HEADS, DIM // HEADS), seed)
    ours = SingleStreamBlock(DIM, HEADS, mlp_ratio=4, qk_norm="rms_norm").eval()
    ours.load_state_dict(flux.state_dict(), strict=True)
    return flux, ours


def block_inputs(batch=2, num_txt=5, rows=3, cols=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(batch, rows * cols, DIM, generator=g)
    txt = torch.randn(batch, num_txt, DIM, generator=g)
    vec = torch.randn(batch, DIM, generator=g)
    return img, txt, vec


# ----------------------------------------------------------------------------------------------------------
# Rotary positions
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows, cols", [(1, 1), (3, 5), (4, 2)])
def test_default_image_ids_are_the_flux_pipelines(rows, cols):
    expected = FluxPipeline._prepare_latent_image_ids(1, rows, cols, "cpu", torch.float32)
    assert torch.equal(image_ids(rows, cols), expected)
    assert torch.equal(text_ids(7), torch.zeros(7, 3))


def test_rotary_embedding_is_fluxs_over_text_then_image_ids():
    txt, img = torch.rand(4, 3) * 9, image_ids(3, 5)
    for theta in (10000, 500):
        cos, sin = RotaryPositionEmbedding(theta, AXES)(txt, img)
        expected_cos, expected_sin = FluxPosEmbed(theta, list(AXES))(torch.cat([txt, img]))
        assert cos.shape == (4 + 15, sum(AXES))
        assert torch.equal(cos, expected_cos) and torch.equal(sin, expected_sin)


def test_attention_depends_only_on_id_differences():
    """Moving every token by the same id offset changes no attention score: what RoPE is for."""
    from diffusers.models.embeddings import apply_rotary_emb

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 12, 16, generator=g), torch.randn(2, 1, 12, 16, generator=g)
    ids = image_ids(3, 4)

    def scores(ids):
        emb = RotaryPositionEmbedding(10000, AXES)(ids[:0], ids)
        return apply_rotary_emb(q, emb) @ apply_rotary_emb(k, emb).transpose(-1, -2)

    shifted = ids + torch.tensor([2.0, 5.0, 7.0])
    assert (scores(ids) - scores(shifted)).abs().max() < 1e-4
    assert (scores(ids) - scores(ids.flip(0))).abs().max() > 1e-2  # positions do matter


# ----------------------------------------------------------------------------------------------------------
# Single-stream block
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch, num_txt, rows, cols", [(1, 3, 2, 2), (2, 5, 3, 4), (3, 1, 4, 2)])
def test_single_stream_block_matches_fluxs(batch, num_txt, rows, cols):
    flux, ours = single_blocks()
    img, txt, vec = block_inputs(batch, num_txt, rows, cols)
    emb = rope(num_txt, rows, cols)
    with torch.no_grad():
        flux_txt, flux_img = flux(img, txt, vec, image_rotary_emb=emb)
        our_img, our_txt = ours(img, txt, vec, image_rotary_emb=emb)
    assert flux_img.abs().max() > 1.0
    assert (our_img - flux_img).abs().max() <= TOLERANCE
    assert (our_txt - flux_txt).abs().max() <= TOLERANCE


def test_single_stream_block_state_dict_has_fluxs_names():
    flux, ours = single_blocks()
    assert sorted(ours.state_dict()) == sorted(flux.state_dict())


def test_masked_text_padding_changes_nothing_for_real_tokens():
    """With the text mask, a padded prompt gives the image and the real text tokens what the unpadded one gives."""
    _, ours = single_blocks()
    img, txt, vec = block_inputs(batch=2, num_txt=4)
    padded = torch.cat([txt, torch.randn(2, 3, DIM)], dim=1)
    mask = torch.tensor([[True] * 4 + [False] * 3] * 2)
    with torch.no_grad():
        img_ref, txt_ref = ours(img, txt, vec, image_rotary_emb=rope(4, 3, 4))
        img_pad, txt_pad = ours(img, padded, vec, attention_mask=mask, image_rotary_emb=rope(7, 3, 4))
        img_unmasked, _ = ours(img, padded, vec, image_rotary_emb=rope(7, 3, 4))
    assert (img_pad - img_ref).abs().max() <= TOLERANCE
    assert (txt_pad[:, :4] - txt_ref).abs().max() <= TOLERANCE
    assert (img_unmasked - img_ref).abs().max() > 1e-3  # without the mask the padding is attended to


def test_single_stream_attention_is_a_diffusers_attention_module():
    """diffusers' FLUX processor runs on it (same result), fusing Q/K/V changes nothing, and the attention backend
    is a setting."""
    _, ours = single_blocks()
    img, txt, vec = block_inputs()
    emb = rope(5, 3, 4)
    with torch.no_grad():
        expected, _ = ours(img, txt, vec, image_rotary_emb=emb)
        ours.attn.set_processor(FluxAttnProcessor())
        with_flux_processor, _ = ours(img, txt, vec, image_rotary_emb=emb)
        ours.attn.set_processor(ours.attn._default_processor_cls())
        ours.attn.fuse_projections()
        fused, _ = ours(img, txt, vec, image_rotary_emb=emb)
        ours.attn.unfuse_projections()
        ours.attn.set_attention_backend("native")
        with attention_backend("native"):
            native, _ = ours(img, txt, vec, image_rotary_emb=emb)
    for actual in (with_flux_processor, fused, native):
        assert (actual - expected).abs().max() <= TOLERANCE


# ----------------------------------------------------------------------------------------------------------
# Guidance embedding
# ----------------------------------------------------------------------------------------------------------
def test_conditioning_with_guidance_matches_fluxs():
    """vec = timestep_mlp(sin(t)) + guidance_mlp(sin(1000 g)) + pooled_text_mlp(pooled), t in [0, 1000] and g the
    guidance scale; diffusers' FLUX scales its [0, 1] timestep and the guidance by 1000 before this module."""
    flux = randomise(CombinedTimestepGuidanceTextProjEmbeddings(DIM, 20))
    timestep_mlp, guidance_mlp, pooled_text_mlp = MLPEmbedder(256, DIM), MLPEmbedder(256, DIM), MLPEmbedder(20, DIM)
    timestep_mlp.load_state_dict(flux.timestep_embedder.state_dict())
    guidance_mlp.load_state_dict(flux.guidance_embedder.state_dict())
    pooled_text_mlp.load_state_dict(flux.text_embedder.state_dict())
    sigma, guidance, pooled = torch.tensor([0.9, 0.25]), torch.tensor([3.5, 1.0]), torch.randn(2, 20)
    with torch.no_grad():
        expected = flux(sigma * 1000, guidance * 1000, pooled)
        vec = (timestep_mlp(sinusoidal_timestep(sigma * 1000)) + guidance_mlp(sinusoidal_guidance(guidance))
               + pooled_text_mlp(pooled))
    assert (vec - expected).abs().max() <= TOLERANCE
    assert not torch.allclose(sinusoidal_guidance(guidance[:1]), sinusoidal_guidance(guidance[1:]))


# ----------------------------------------------------------------------------------------------------------
# Conversion: configs, names, state dicts
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [{}, dict(guidance_embeds=False), dict(in_channels=64, out_channels=16)],
                         ids=["dev", "schnell", "fill-like"])
def test_flux_config_round_trips(options):
    flux = {**FLUX_TINY, "out_channels": None, **options}
    ours = conversion.flux_config_to_mmdit(flux)
    assert (ours["patch_size"], ours["img_dim"], ours["in_channels"]) == (2, flux["in_channels"], flux["in_channels"] // 4)
    assert ours["pos_embed_type"] == "rope" and ours["use_text_attention_mask"] is False
    back = conversion.mmdit_config_to_flux(ours)
    assert back == {**flux, "axes_dims_rope": tuple(flux["axes_dims_rope"])}


@pytest.mark.parametrize(
    "options, message",
    [(dict(patch_size=2), r"patch_size=2; FLUX\.1 packs"), (dict(in_channels=6), r"in_channels=6, not a multiple of 4"),
     (dict(out_channels=10), r"out_channels=10, not a multiple of 4")],
)
def test_flux_configs_mmdit_cannot_express_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        conversion.flux_config_to_mmdit({**FLUX_TINY, "out_channels": None, **options})


@pytest.mark.parametrize(
    "option, value",
    [("pos_embed_type", "sincos"), ("qk_norm", None), ("mlp_ratio", 2), ("patch_size", 1),
     ("txt_pre_only_last_block", True), ("rope_theta", 256), ("dual_attention_layers", (0,))],
)
def test_mmdit_configs_flux_cannot_express_are_refused(option, value):
    config = {**conversion.flux_config_to_mmdit({**FLUX_TINY, "out_channels": None}), option: value}
    with pytest.raises(ValueError, match=re.escape(f"FLUX has no equivalent of `{option}`={value!r}")):
        conversion.mmdit_config_to_flux(config)


def test_module_names_map_both_ways_and_flux_only_names_are_recognised():
    pairs = [("time_text_embed.guidance_embedder.linear_1", "guidance_mlp.linear_1"),
             ("time_text_embed.text_embedder", "pooled_text_mlp"),
             ("x_embedder", "x_embedder"), ("norm_out.linear", "norm_out.linear"),
             ("single_transformer_blocks.3.attn.to_k", "single_transformer_blocks.3.attn.to_k"),
             ("single_transformer_blocks.0.norm.linear.weight", "single_transformer_blocks.0.norm.linear.weight")]
    for flux_name, ours in pairs:
        assert conversion.flux_module_name_to_mmdit(flux_name) == ours
        assert conversion.mmdit_module_name_to_flux(ours) == flux_name
    for double in ("transformer_blocks.0.ff_context.net.2", "transformer_blocks.0.norm1.linear.bias"):
        ours = conversion.flux_module_name_to_mmdit(double)
        assert ours is not None and ours != double and conversion.mmdit_module_name_to_flux(ours) == double
    for same in ("transformer_blocks.1.attn.add_k_proj", "transformer_blocks.1.attn.to_out.0.weight"):
        assert conversion.flux_module_name_to_mmdit(same) == same == conversion.mmdit_module_name_to_flux(same)
    for unknown in ("transformer_blocks.0.attn2.to_q", "single_transformer_blocks.0.attn.to_out.0",
                    "pos_embed.proj", "time_text_embed.bogus"):
        assert conversion.flux_module_name_to_mmdit(unknown) is None
    assert conversion.is_flux_module_name("time_text_embed.timestep_embedder.linear_1")
    assert conversion.is_flux_module_name("transformer_blocks.2.ff.net.0.proj")
    for shared in ("single_transformer_blocks.0.attn.to_q", "transformer_blocks.2.attn.to_q", "x_embedder",
                   "proj_out", "guidance_mlp.linear_2"):
        assert not conversion.is_flux_module_name(shared)


@pytest.mark.parametrize("guidance_embeds", [True, False])
def test_flux_state_dict_round_trips_exactly(guidance_embeds):
    flux = randomise(FluxTransformer2DModel(**{**FLUX_TINY, "guidance_embeds": guidance_embeds}))
    config = conversion.flux_config_to_mmdit(flux.config)
    ours = conversion.flux_state_dict_to_mmdit(flux.state_dict(), config)
    assert not any(conversion.is_flux_module_name(key) for key in ours)
    assert ("guidance_mlp.linear_1.weight" in ours) == guidance_embeds
    scale, shift = flux.state_dict()["norm_out.linear.weight"].chunk(2)
    assert torch.equal(ours["norm_out.linear.weight"], torch.cat([shift, scale]))  # (shift, scale) in MMDiT
    back = conversion.mmdit_state_dict_to_flux(ours, config)
    expected = flux.state_dict()
    assert back.keys() == expected.keys()
    assert all(torch.equal(back[key], expected[key]) for key in expected)


def test_an_unmapped_flux_key_is_refused_by_name():
    flux = randomise(FluxTransformer2DModel(**FLUX_TINY))
    state = {**flux.state_dict(), "single_transformer_blocks.0.attn.bogus.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"FLUX tensors with no counterpart: \['single_transformer_blocks\.0\.attn\.bogus\.weight'\]"):
        conversion.flux_state_dict_to_mmdit(state, conversion.flux_config_to_mmdit(flux.config))
