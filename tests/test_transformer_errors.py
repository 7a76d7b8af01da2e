"""Every invalid configuration or input is refused with a `ValueError` whose message names the problem."""

from __future__ import annotations

import re

import pytest
import torch

from mmdit_diffusers import MMDiTTransformer2DModel

# img_tokens 16 -> a 4 x 4 patch grid, so latents may be at most 8 x 8 (patch 2).
TINY = dict(img_dim=16, txt_dim=8, cond_dim=12, img_tokens=16, txt_tokens=10, hidden_size=32, depth=2, num_heads=2)


@pytest.fixture(scope="module")
def model() -> MMDiTTransformer2DModel:
    return MMDiTTransformer2DModel(**TINY).eval()


def good_inputs(batch: int = 2, txt_len: int = 5, latents: tuple[int, int] | None = (8, 8)) -> dict:
    hidden = torch.randn(batch, 4, *latents) if latents else torch.randn(batch, 16, 16)
    return dict(
        hidden_states=hidden,
        encoder_hidden_states=torch.randn(batch, txt_len, 8),
        pooled_projections=torch.randn(batch, 12),
        timestep=torch.full((batch,), 500.0),
    )


def forward(model, **changes):
    with torch.no_grad():
        return model(**{**good_inputs(), **changes})


def test_good_inputs_are_accepted(model):
    assert forward(model).sample.shape == (2, 4, 8, 8)
    assert forward(model, **good_inputs(latents=None)).sample.shape == (2, 16, 16)


# ----------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------
def build(**changes):
    return MMDiTTransformer2DModel(**{**TINY, **changes})


def test_hidden_size_not_divisible_by_num_heads():
    with pytest.raises(ValueError, match=r"`hidden_size`=32 is not divisible by `num_heads`=3"):
        build(num_heads=3)


def test_img_dim_inconsistent_with_in_channels_and_patch_size():
    with pytest.raises(ValueError, match=r"`img_dim`=16 must equal in_channels \* patch_size\*\*2"):
        build(in_channels=3)


def test_img_dim_not_a_multiple_of_the_patch_area():
    with pytest.raises(ValueError, match=r"`img_dim`=18 is not a multiple of patch_size\*\*2=4"):
        build(img_dim=18)


def test_unknown_qk_norm():
    with pytest.raises(ValueError, match=r"Unknown `qk_norm` 'l2'"):
        build(qk_norm="l2")


def test_unknown_pos_embed_type():
    with pytest.raises(ValueError, match=r"Unknown `pos_embed_type` 'learned'"):
        build(pos_embed_type="learned")


@pytest.mark.parametrize("layers", [(2,), (0, -1)])
def test_dual_attention_layer_out_of_range(layers):
    with pytest.raises(ValueError, match=r"`dual_attention_layers` .* out of range for depth=2"):
        build(dual_attention_layers=layers)


@pytest.mark.parametrize(
    "name, value",
    [("depth", 0), ("hidden_size", -1), ("img_dim", 0), ("patch_size", 0), ("num_heads", 0), ("txt_tokens", 0),
     ("img_tokens", -4), ("depth", 1.5), ("depth", True)],
)
def test_non_positive_or_non_integer_sizes(name, value):
    with pytest.raises(ValueError, match=rf"`{name}` must be a positive integer; got {re.escape(repr(value))}"):
        build(**{name: value})


@pytest.mark.parametrize("name", ["cond_dim", "in_channels", "out_channels", "sample_size", "pos_embed_max_size"])
def test_non_positive_optional_sizes(name):
    with pytest.raises(ValueError, match=rf"`{name}` must be a positive integer or None; got 0"):
        build(**{name: 0})


def test_non_positive_mlp_ratio():
    with pytest.raises(ValueError, match=r"`mlp_ratio` must be a positive number"):
        build(mlp_ratio=0)


def test_token_grid_larger_than_the_position_grid():
    message = r"`img_tokens`=16 is read on a 4 x 4 grid, larger than `pos_embed_max_size`=3"
    with pytest.raises(ValueError, match=message):
        build(pos_embed_max_size=3)


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"Unknown preset 'huge'"):
        MMDiTTransformer2DModel.from_preset("huge")


# ----------------------------------------------------------------------------------------------------------
# Forward inputs
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 16), (2, 4, 8, 8, 1)])
def test_hidden_states_of_the_wrong_rank(model, shape):
    with pytest.raises(ValueError, match=r"`hidden_states` must be latents \[B, C, H, W\] or tokens"):
        forward(model, hidden_states=torch.randn(shape))


@pytest.mark.parametrize("shape", [(2, 16, 12), (2, 15, 16)], ids=["feature size", "token count"])
def test_tokens_of_the_wrong_shape(model, shape):
    with pytest.raises(ValueError, match=r"expected \[B, img_tokens=16, img_dim=16\]"):
        forward(model, hidden_states=torch.randn(shape))


def test_latents_with_the_wrong_channel_count(model):
    with pytest.raises(ValueError, match=r"`hidden_states` has 3 channels; expected in_channels=4"):
        forward(model, hidden_states=torch.randn(2, 3, 8, 8))


@pytest.mark.parametrize("hw, name, size", [((7, 8), "height", 7), ((8, 5), "width", 5)])
def test_latent_side_not_a_multiple_of_patch_size(model, hw, name, size):
    with pytest.raises(ValueError, match=rf"`hidden_states` {name} {size} is not a positive multiple of patch_size=2"):
        forward(model, hidden_states=torch.randn(2, 4, *hw))


@pytest.mark.parametrize("hw, name, size", [((10, 8), "height", 10), ((4, 12), "width", 12)])
def test_latent_side_larger_than_the_position_grid(model, hw, name, size):
    with pytest.raises(ValueError, match=rf"`hidden_states` {name} {size} exceeds the position grid.*= 8"):
        forward(model, hidden_states=torch.randn(2, 4, *hw))


@pytest.mark.parametrize(
    "name, value",
    [
        ("encoder_hidden_states", torch.randn(3, 5, 8)),
        ("pooled_projections", torch.randn(1, 12)),
        ("timestep", torch.full((3,), 500.0)),
    ],
)
def test_batch_sizes_that_disagree(model, name, value):
    with pytest.raises(ValueError, match=rf"Batch sizes disagree: .*'{name}': {value.shape[0]}"):
        forward(model, **{name: value})


@pytest.mark.parametrize("shape", [(2, 4), (1, 5), (2, 5, 1)])
def test_mask_of_the_wrong_shape(model, shape):
    with pytest.raises(ValueError, match=r"`encoder_attention_mask` has shape .*; expected \[B, L\] = \[2, 5\]"):
        forward(model, encoder_attention_mask=torch.ones(shape))


def test_too_many_text_tokens(model):
    message = r"`encoder_hidden_states` has 11 tokens; the model accepts at most txt_tokens=10"
    with pytest.raises(ValueError, match=message):
        forward(model, encoder_hidden_states=torch.randn(2, 11, 8))


@pytest.mark.parametrize("shape", [(2, 5, 7), (2, 8)])
def test_encoder_hidden_states_of_the_wrong_feature_size_or_rank(model, shape):
    with pytest.raises(ValueError, match=r"`encoder_hidden_states` has shape .*; expected \[B, L, txt_dim=8\]"):
        forward(model, encoder_hidden_states=torch.randn(shape))


@pytest.mark.parametrize("shape", [(2, 32), (2, 1, 12)])
def test_pooled_projections_of_the_wrong_size(model, shape):
    with pytest.raises(ValueError, match=r"`pooled_projections` has shape .*; expected \[B, cond_dim=12\]"):
        forward(model, pooled_projections=torch.randn(shape))


def test_timestep_of_the_wrong_rank(model):
    with pytest.raises(ValueError, match=r"`timestep` has shape \(2, 1\); expected \[B\] or a scalar"):
        forward(model, timestep=torch.full((2, 1), 500.0))
