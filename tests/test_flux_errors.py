"""The FLUX options of `MMDiTTransformer2DModel` refuse what they cannot take, with messages that name the
argument, the value and what is expected; and they are off by default, so today's configs build what they built."""

from __future__ import annotations

import re

import pytest
import torch

from mmdit_diffusers import MMDiTTransformer2DModel
from mmdit_diffusers.errors import InputError

FLUX_STYLE = dict(img_dim=16, txt_dim=8, cond_dim=8, img_tokens=16, txt_tokens=12, hidden_size=32, depth=1,
                  num_heads=2, num_single_layers=1, pos_embed_type="rope", axes_dims_rope=(4, 6, 6),
                  qk_norm="rms_norm", txt_pre_only_last_block=False, guidance_embeds=True)


def build(**overrides) -> MMDiTTransformer2DModel:
    return MMDiTTransformer2DModel(**{**FLUX_STYLE, **overrides})


def inputs(batch=2, height=8, width=12, txt_len=5, **overrides) -> dict:
    """Latents of a 4 x 6 patch grid (24 image tokens), 5 text tokens, guidance 3.5; `overrides` replace them
    (None: left out)."""
    kwargs = dict(hidden_states=torch.randn(batch, 4, height, width), encoder_hidden_states=torch.randn(batch, txt_len, 8),
                  pooled_projections=torch.randn(batch, 8), timestep=torch.tensor([500.0] * batch),
                  guidance=torch.tensor([3.5] * batch))
    kwargs.update(overrides)
    return {k: v for k, v in kwargs.items() if v is not None}


def test_flux_options_are_off_by_default():
    model = MMDiTTransformer2DModel(img_dim=16, txt_dim=8, img_tokens=16, hidden_size=32, depth=1, num_heads=2)
    cfg = model.config
    assert (cfg.num_single_layers, cfg.pos_embed_type, cfg.guidance_embeds) == (0, "sincos", False)
    assert model.guidance_mlp is None and len(model.single_transformer_blocks) == 0
    assert not any(k.startswith(("guidance_mlp", "single_transformer_blocks")) for k in model.state_dict())


def test_a_scalar_guidance_is_broadcast_over_the_batch():
    model = build().eval()
    with torch.no_grad():
        scalar = model(**inputs(guidance=3.5)).sample
        per_sample = model(**inputs()).sample
    assert torch.equal(scalar, per_sample)


# ----------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("axes", [(4, 6, 4), (4, 5, 7), (0, 8, 8), ()])
def test_rope_axes_must_split_the_head_dimension_into_even_parts(axes):
    with pytest.raises(ValueError, match=re.escape(f"`axes_dims_rope`={axes!r} must be positive even numbers summing to "
                                                   "the head dimension hidden_size // num_heads = 16")):
        build(axes_dims_rope=axes)


def test_rope_theta_must_be_positive():
    with pytest.raises(ValueError, match=r"`rope_theta` must be a positive number; got 0"):
        build(rope_theta=0)


def test_single_stream_blocks_need_the_last_text_output():
    with pytest.raises(ValueError, match=r"`txt_pre_only_last_block`=True .* `num_single_layers`=1 single-stream"):
        build(txt_pre_only_last_block=True)


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_num_single_layers_must_be_a_non_negative_integer(value):
    with pytest.raises(ValueError, match=rf"`num_single_layers` must be a non-negative integer; got {value!r}"):
        build(num_single_layers=value)


def test_sincos_models_ignore_the_rope_options():
    model = build(pos_embed_type="sincos", axes_dims_rope=(1, 2, 3))  # not read: no error
    assert model.config.pos_embed_type == "sincos"


# ----------------------------------------------------------------------------------------------------------
# Forward inputs
# ----------------------------------------------------------------------------------------------------------
def test_guidance_is_required_with_a_guidance_embedding():
    with pytest.raises(InputError, match=r"`guidance` is required: .*guidance_embeds=True"):
        build()(**inputs(guidance=None))


def test_guidance_is_refused_without_a_guidance_embedding():
    with pytest.raises(InputError, match=r"`guidance` was given, but .*guidance_embeds=False"):
        build(guidance_embeds=False)(**inputs())


def test_guidance_of_the_wrong_shape():
    with pytest.raises(InputError, match=r"`guidance` has shape \(3,\); expected \[B\] = \[2\] or a scalar"):
        build()(**inputs(guidance=torch.ones(3)))


@pytest.mark.parametrize("name", ["img_ids", "txt_ids"])
def test_ids_are_refused_by_a_sincos_model(name):
    model = build(pos_embed_type="sincos", guidance_embeds=False, pos_embed_max_size=8)
    with pytest.raises(InputError, match=rf"`{name}` is read by models with pos_embed_type='rope'"):
        model(**inputs(guidance=None, **{name: torch.zeros(24 if name == "img_ids" else 5, 3)}))


@pytest.mark.parametrize(
    "name, value, expected",
    [("img_ids", torch.zeros(23, 3), r"\[24, 3\].* 24 image tokens"),
     ("img_ids", torch.zeros(1, 24, 3), r"\[24, 3\]"),
     ("img_ids", torch.zeros(24, 2), r"\[24, 3\]: one id of len\(axes_dims_rope\)=3"),
     ("txt_ids", torch.zeros(4, 3), r"\[5, 3\].* 5 text tokens")],
    ids=["img_count", "img_batched", "img_axes", "txt_count"],
)
def test_ids_of_the_wrong_shape_name_the_expected_one(name, value, expected):
    with pytest.raises(InputError, match=re.escape(f"`{name}` has shape {tuple(value.shape)!r}") + ".*" + expected):
        build()(**inputs(**{name: value}))


def test_packed_tokens_without_ids_must_be_the_img_tokens_grid():
    model = build()
    tokens = inputs(hidden_states=torch.randn(2, 24, 16))
    with pytest.raises(ValueError, match=r"expected \[B, img_tokens=16, img_dim=16\]"):
        model(**tokens)
    with torch.no_grad():  # with their ids, any number of tokens
        from mmdit_diffusers.models.rope import image_ids

        assert model(**tokens, img_ids=image_ids(4, 6)).sample.shape == (2, 24, 16)


def test_a_rope_model_with_pos_embed_max_size_refuses_larger_latents():
    model = build(pos_embed_max_size=4)
    with pytest.raises(ValueError, match=r"`hidden_states` width 12 exceeds the position grid: .* = 8"):
        model(**inputs())
