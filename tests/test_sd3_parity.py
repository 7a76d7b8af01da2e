"""`MMDiTTransformer2DModel` computes what diffusers' `SD3Transformer2DModel` computes, and the conversion
between the two is exact and refuses what it cannot map.

The SD3 models are built here with random weights redrawn from N(0, 0.2) (diffusers' init zeroes the
output projection and the AdaLN gates, which would hide most mistakes)."""

from __future__ import annotations

import pytest
import torch
from diffusers import SD3Transformer2DModel

from mmdit_diffusers import MMDiTTransformer2DModel
from mmdit_diffusers.conversion import sd3 as conversion

SD3_TINY = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=24,
    caption_projection_dim=32,
    pooled_projection_dim=20,
    out_channels=4,
    pos_embed_max_size=16,  # latents up to 32 x 32 (patch 2)
)
TOLERANCE = 1e-4


def make_sd3(seed: int = 0, **overrides) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**{**SD3_TINY, **overrides})
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.2)
    return model.eval()


def sd3_inputs(sd3: SD3Transformer2DModel, batch: int = 2, height: int = 12, width: int = 16, txt_len: int = 13):
    g = torch.Generator().manual_seed(1)
    cfg = sd3.config
    return dict(
        hidden_states=torch.randn(batch, cfg.in_channels, height, width, generator=g),
        encoder_hidden_states=torch.randn(batch, txt_len, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g),
        timestep=torch.rand(batch, generator=g) * 1000,
    )


def outputs(sd3, mmdit, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return sd3(**kwargs).sample, mmdit(**kwargs).sample


def assert_parity(sd3, mmdit, kwargs):
    expected, actual = outputs(sd3, mmdit, kwargs)
    assert actual.shape == expected.shape
    assert expected.abs().max() > 1.0  # the comparison is not between near-zero outputs
    assert (actual - expected).abs().max().item() <= TOLERANCE


def assert_state_dicts_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


CONFIGS = {
    "default": {},
    "rms_qk_norm": dict(qk_norm="rms_norm"),
    "layer_qk_norm": dict(qk_norm="layer_norm"),
    "rms_qk_norm+dual_attention": dict(qk_norm="rms_norm", dual_attention_layers=(0, 1)),
    "patch_1": dict(patch_size=1, pos_embed_max_size=32),
    "out_channels_differ": dict(out_channels=6),
    "depth_1": dict(num_layers=1),
}


# ----------------------------------------------------------------------------------------------------------
# Numerical parity
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", CONFIGS.values(), ids=CONFIGS.keys())
def test_forward_matches_sd3(options):
    sd3 = make_sd3(**options)
    assert_parity(sd3, MMDiTTransformer2DModel.from_sd3(sd3), sd3_inputs(sd3))


@pytest.mark.parametrize(
    "batch, height, width, txt_len",
    [(1, 8, 8, 8), (3, 12, 16, 13), (2, 16, 6, 1), (2, 32, 32, 5)],
    ids=["square", "non-square", "tall", "largest"],
)
def test_forward_matches_sd3_across_shapes(batch, height, width, txt_len):
    sd3 = make_sd3(qk_norm="rms_norm")
    mmdit = MMDiTTransformer2DModel.from_sd3(sd3)
    assert_parity(sd3, mmdit, sd3_inputs(sd3, batch, height, width, txt_len))


@pytest.mark.parametrize(
    "options", [CONFIGS["default"], CONFIGS["rms_qk_norm+dual_attention"]], ids=["default", "dual"]
)
def test_fused_qkv_forward_matches_sd3(options):
    sd3 = make_sd3(**options)
    mmdit = MMDiTTransformer2DModel.from_sd3(sd3)
    mmdit.fuse_qkv_projections()
    assert_parity(sd3, mmdit, sd3_inputs(sd3, batch=3))


def test_forward_matches_sd3_in_training_mode_with_gradients():
    sd3 = make_sd3(qk_norm="rms_norm", dual_attention_layers=(0,))
    mmdit = MMDiTTransformer2DModel.from_sd3(sd3)
    kwargs = sd3_inputs(sd3)
    expected, actual = sd3.train()(**kwargs).sample, mmdit.train()(**kwargs).sample
    assert (actual - expected).abs().max().item() <= TOLERANCE
    expected.square().mean().backward()
    actual.square().mean().backward()
    # the timestep embedder is named alike in both models, and its gradient depends on everything downstream
    sd3_grad = sd3.time_text_embed.timestep_embedder.linear_1.weight.grad
    assert (mmdit.timestep_mlp.linear_1.weight.grad - sd3_grad).abs().max().item() <= 1e-4 * sd3_grad.abs().max().item()


# ----------------------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", CONFIGS.values(), ids=CONFIGS.keys())
def test_round_trip_reproduces_the_sd3_state_dict(options):
    sd3 = make_sd3(**options)
    back = MMDiTTransformer2DModel.from_sd3(sd3).to_sd3()
    assert isinstance(back, SD3Transformer2DModel)
    assert_state_dicts_equal(back.state_dict(), sd3.state_dict())


def test_round_trip_from_a_fused_model_reproduces_the_sd3_state_dict():
    sd3 = make_sd3(qk_norm="rms_norm", dual_attention_layers=(1,))
    mmdit = MMDiTTransformer2DModel.from_sd3(sd3)
    mmdit.fuse_qkv_projections()
    assert_state_dicts_equal(mmdit.to_sd3().state_dict(), sd3.state_dict())


def test_converted_config_describes_the_sd3_model():
    sd3 = make_sd3(qk_norm="rms_norm", dual_attention_layers=(0,), out_channels=6)
    cfg = MMDiTTransformer2DModel.from_sd3(sd3).config
    assert cfg.hidden_size == SD3_TINY["num_attention_heads"] * SD3_TINY["attention_head_dim"]
    assert (cfg.depth, cfg.num_heads, cfg.patch_size) == (2, 2, 2)
    assert (cfg.txt_dim, cfg.cond_dim) == (24, 20)
    assert (cfg.in_channels, cfg.out_channels, cfg.img_dim) == (4, 6, 16)
    assert cfg.qk_norm == "rms_norm" and tuple(cfg.dual_attention_layers) == (0,)
    assert cfg.txt_pre_only_last_block is True  # SD3's context_pre_only last block
    assert cfg.use_text_attention_mask is False  # SD3 was trained attending to padding


def test_mmdit_to_sd3_and_back_reproduces_the_mmdit_state_dict():
    torch.manual_seed(0)
    mmdit = MMDiTTransformer2DModel(
        img_dim=16, txt_dim=24, cond_dim=20, img_tokens=16, txt_tokens=20, hidden_size=32, depth=2, num_heads=2,
        qk_norm="rms_norm", txt_pre_only_last_block=True,
    )
    with torch.no_grad():
        for param in mmdit.parameters():
            param.normal_(0, 0.2)
    sd3 = mmdit.to_sd3().eval()
    again = MMDiTTransformer2DModel.from_sd3(sd3)
    assert_state_dicts_equal(again.state_dict(), mmdit.state_dict())
    assert_parity(sd3, mmdit.eval(), sd3_inputs(sd3, height=8, width=8))


def test_conversion_from_a_saved_diffusers_folder(tmp_path):
    sd3 = make_sd3(qk_norm="rms_norm")
    sd3.save_pretrained(tmp_path / "sd3")
    mmdit = MMDiTTransformer2DModel.from_sd3(tmp_path / "sd3")
    assert_parity(sd3, mmdit, sd3_inputs(sd3))
    mmdit = MMDiTTransformer2DModel.from_sd3(str(tmp_path / "sd3"))
    assert_parity(sd3, mmdit, sd3_inputs(sd3))


def test_conversion_from_a_pipeline_folder_with_subfolder(tmp_path):
    sd3 = make_sd3()
    sd3.save_pretrained(tmp_path / "pipe" / "transformer")
    mmdit = MMDiTTransformer2DModel.from_sd3(tmp_path / "pipe", subfolder="transformer")
    assert_parity(sd3, mmdit, sd3_inputs(sd3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_conversion_keeps_a_half_precision_dtype(dtype):
    sd3 = make_sd3().to(dtype)
    mmdit = MMDiTTransformer2DModel.from_sd3(sd3)
    assert {p.dtype for p in mmdit.parameters()} == {dtype}
    assert {p.dtype for p in mmdit.to_sd3().parameters()} == {dtype}


def test_to_sd3_keeps_the_dtype():
    sd3 = make_sd3()
    mmdit = MMDiTTransformer2DModel.from_sd3(sd3).to(torch.bfloat16)
    back = mmdit.to_sd3()
    assert {p.dtype for p in back.parameters()} == {torch.bfloat16}
    expected = {k: v.to(torch.bfloat16) for k, v in sd3.state_dict().items() if k != "pos_embed.pos_embed"}
    actual = {k: v for k, v in back.state_dict().items() if k != "pos_embed.pos_embed"}
    assert_state_dicts_equal(actual, expected)


def test_module_names_map_both_ways_and_sd3_only_names_are_recognised():
    pairs = [("transformer_blocks.3.attn.add_q_proj", "transformer_blocks.3.attn.add_q_proj"),  # attention: alike
             ("transformer_blocks.0.attn2.to_out.0", "transformer_blocks.0.attn2.to_out.0"),
             ("transformer_blocks.2.ff_context.net.2.weight", "transformer_blocks.2.txt.mlp.fc2.weight"),
             ("transformer_blocks.1.norm1_context.linear.bias", "transformer_blocks.1.txt.modulation.linear.bias"),
             ("pos_embed.proj", "x_embedder"), ("proj_out", "proj_out")]
    for sd3_name, ours in pairs:
        assert conversion.sd3_module_name_to_mmdit(sd3_name) == ours
        assert conversion.mmdit_module_name_to_sd3(ours) == sd3_name
    assert conversion.sd3_module_name_to_mmdit("transformer_blocks.0.attn.bogus") is None
    assert conversion.sd3_module_name_to_mmdit("pos_embed.proj_extra") is None
    assert conversion.sd3_module_name_to_mmdit("transformer_blocks.0.attn2.add_q_proj") is None  # self-attention
    assert conversion.is_sd3_module_name("transformer_blocks.0.ff.net.2")
    assert conversion.is_sd3_module_name("transformer_blocks.0.norm1.linear")
    assert conversion.is_sd3_module_name("time_text_embed.text_embedder.linear_1")
    for name in ("proj_out", "norm_out.linear", "context_embedder", "transformer_blocks.0.attn2.to_q",
                 "transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.img.mlp.fc1"):
        assert not conversion.is_sd3_module_name(name)


def test_conversion_refuses_an_unmapped_key():
    state = {k: v for k, v in make_sd3().state_dict().items() if k != "pos_embed.pos_embed"}
    state["transformer_blocks.0.attn.bogus_proj.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"no counterpart: \['transformer_blocks\.0\.attn\.bogus_proj\.weight'\]"):
        conversion.sd3_state_dict_to_mmdit(state, conversion.sd3_config_to_mmdit(make_sd3().config))


def test_conversion_refuses_an_unmapped_mmdit_key():
    mmdit = MMDiTTransformer2DModel(img_dim=16, txt_dim=8, img_tokens=16, hidden_size=32, depth=1, num_heads=2)
    state = dict(mmdit.state_dict())
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"Cannot convert MMDiT tensors with no counterpart: \['extra\.weight'\]"):
        conversion.mmdit_state_dict_to_sd3(state, mmdit.config)


def test_from_sd3_refuses_a_missing_tensor(monkeypatch):
    sd3 = make_sd3()
    state = dict(sd3.state_dict())
    del state["transformer_blocks.1.attn.to_k.weight"]
    monkeypatch.setattr(sd3, "state_dict", lambda *args, **kwargs: state)
    with pytest.raises(ValueError, match=r"missing \['transformer_blocks\.1\.attn\.to_k\.weight'\]"):
        MMDiTTransformer2DModel.from_sd3(sd3)


def test_from_sd3_refuses_an_unexpected_tensor(monkeypatch):
    sd3 = make_sd3()
    state = dict(sd3.state_dict())
    state["transformer_blocks.7.attn.to_q.weight"] = torch.zeros(32, 32)  # a block the config does not have
    monkeypatch.setattr(sd3, "state_dict", lambda *args, **kwargs: state)
    with pytest.raises(ValueError, match=r"unexpected \['transformer_blocks\.7\.attn\.to_q\.weight'\]"):
        MMDiTTransformer2DModel.from_sd3(sd3)


def test_from_sd3_refuses_a_position_table_that_does_not_match_the_config(monkeypatch):
    sd3 = make_sd3()
    state = dict(sd3.state_dict())
    state["pos_embed.pos_embed"] = state["pos_embed.pos_embed"] + 1
    monkeypatch.setattr(sd3, "state_dict", lambda *args, **kwargs: state)
    with pytest.raises(ValueError, match=r"`pos_embed\.pos_embed` differs"):
        MMDiTTransformer2DModel.from_sd3(sd3)


def test_from_sd3_refuses_other_objects():
    with pytest.raises(TypeError, match=r"SD3Transformer2DModel or a folder path; got dict"):
        MMDiTTransformer2DModel.from_sd3({})


def test_from_sd3_refuses_a_caption_projection_narrower_than_the_streams():
    sd3 = make_sd3(caption_projection_dim=16)
    with pytest.raises(ValueError, match=r"caption_projection_dim=16"):
        MMDiTTransformer2DModel.from_sd3(sd3)


@pytest.mark.parametrize(
    "option, value",
    [("mlp_ratio", 2), ("txt_pre_only_last_block", False)],
)
def test_to_sd3_refuses_options_sd3_cannot_express(option, value):
    options = {"mlp_ratio": 4, "txt_pre_only_last_block": True, option: value}
    mmdit = MMDiTTransformer2DModel(
        img_dim=16, txt_dim=8, img_tokens=16, hidden_size=32, depth=1, num_heads=2, **options
    )
    with pytest.raises(ValueError, match=rf"SD3 has no equivalent of `{option}`={value!r}"):
        mmdit.to_sd3()


def test_sd3_config_without_pos_embed_max_size_is_refused():
    """diffusers recomputes positions per input size when pos_embed_max_size is None; we crop a fixed grid,
    so converting would silently change outputs at other sizes."""
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        MMDiTTransformer2DModel.from_sd3(make_sd3(pos_embed_max_size=None))
