"""A FLUX-style `MMDiTTransformer2DModel` computes what diffusers' `FluxTransformer2DModel` computes, the conversion
between the two is exact both ways and refuses what it cannot map, and our own features (text padding mask,
gradient checkpointing, fused QKV, LoRA, torch.compile) work on FLUX-style configs.

The FLUX models are built here with random weights redrawn from N(0, 0.2) (diffusers' init would leave AdaLN
biases at zero and hide mistakes). FLUX takes packed latents (our `patchify`), ids, the timestep as sigma and the
guidance scale; ours takes the same latents unpacked, the timestep as sigma * 1000 and the same guidance scale."""

from __future__ import annotations

import re

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from mmdit_diffusers import PRESETS, MMDiTTransformer2DModel
from mmdit_diffusers.conversion import flux as conversion
from mmdit_diffusers.models.embeddings import patchify, unpatchify
from mmdit_diffusers.models.rope import image_ids, text_ids
from mmdit_diffusers.pipelines.text_encoding import uses_text_mask

FLUX_TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=20, guidance_embeds=True,
                 axes_dims_rope=(4, 6, 6))
TOLERANCE = 1e-5

CONFIGS = {
    "dev": {},
    "schnell": dict(guidance_embeds=False),
    "no_single_blocks": dict(num_single_layers=0),
    "single_heavy": dict(num_layers=1, num_single_layers=3),
    "4_heads_of_8": dict(num_attention_heads=4, attention_head_dim=8, axes_dims_rope=(2, 2, 4)),
    "fill_like_channels": dict(in_channels=32, out_channels=16),  # FLUX.1 Fill: more input than output channels
}


def make_flux(seed: int = 0, **overrides) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**{**FLUX_TINY, **overrides})
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.2)
    return model.eval()


def flux_inputs(flux: FluxTransformer2DModel, batch=2, height=12, width=16, txt_len=7, seed=1):
    """(our kwargs, FLUX's kwargs) for the same latents, text, timestep and guidance."""
    g = torch.Generator().manual_seed(seed)
    cfg = flux.config
    latents = torch.randn(batch, cfg.in_channels // 4, height, width, generator=g)
    common = dict(
        encoder_hidden_states=torch.randn(batch, txt_len, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g),
    )
    sigma = torch.rand(batch, generator=g)
    guidance = {"guidance": torch.tensor([3.5, 1.5, 7.0][:batch] + [2.0] * max(0, batch - 3))} if cfg.guidance_embeds else {}
    ours = dict(hidden_states=latents, **common, timestep=sigma * 1000, **guidance)
    theirs = dict(hidden_states=patchify(latents, 2), **common, timestep=sigma, **guidance,
                  img_ids=FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, "cpu", torch.float32),
                  txt_ids=torch.zeros(txt_len, 3))
    return ours, theirs


def outputs(flux, mmdit, ours, theirs):
    """(FLUX's output unpacked to latents, ours)."""
    height, width = ours["hidden_states"].shape[-2:]
    with torch.no_grad():
        expected = unpatchify(flux(**theirs).sample, 2, height, width)
        return expected, mmdit(**ours).sample


def assert_parity(flux, mmdit, ours, theirs, tolerance=TOLERANCE):
    expected, actual = outputs(flux, mmdit, ours, theirs)
    assert actual.shape == expected.shape
    assert expected.abs().max() > 1.0  # the comparison is not between near-zero outputs
    assert (actual - expected).abs().max().item() <= tolerance


def assert_state_dicts_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


# ----------------------------------------------------------------------------------------------------------
# Numerical parity
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", CONFIGS.values(), ids=CONFIGS.keys())
def test_forward_matches_flux(options):
    flux = make_flux(**options)
    assert_parity(flux, MMDiTTransformer2DModel.from_flux(flux), *flux_inputs(flux))


@pytest.mark.parametrize(
    "batch, height, width, txt_len",
    [(1, 8, 8, 4), (3, 12, 16, 13), (2, 16, 6, 1), (2, 32, 20, 9)],
    ids=["square", "wide", "tall", "larger"],
)
@pytest.mark.parametrize("guidance_embeds", [True, False], ids=["dev", "schnell"])
def test_forward_matches_flux_across_shapes(batch, height, width, txt_len, guidance_embeds):
    flux = make_flux(guidance_embeds=guidance_embeds)
    mmdit = MMDiTTransformer2DModel.from_flux(flux)
    assert_parity(flux, mmdit, *flux_inputs(flux, batch, height, width, txt_len))


def test_packed_tokens_with_explicit_ids_match_flux():
    """FLUX's own call: packed tokens, ids of any kind (here image ids moved to another frame and text ids that
    are not zero), the same ids passed to both."""
    flux = make_flux()
    mmdit = MMDiTTransformer2DModel.from_flux(flux)
    _, theirs = flux_inputs(flux, batch=2, height=12, width=8, txt_len=5)
    theirs["img_ids"] = theirs["img_ids"] + torch.tensor([1.0, 3.0, 2.0])
    theirs["txt_ids"] = torch.arange(15.0).reshape(5, 3)
    ours = dict(theirs, timestep=theirs["timestep"] * 1000)
    with torch.no_grad():
        expected, actual = flux(**theirs).sample, mmdit(**ours).sample
    assert actual.shape == expected.shape == theirs["hidden_states"].shape
    assert (actual - expected).abs().max() <= TOLERANCE
    default_ids = dict(ours, img_ids=image_ids(6, 4), txt_ids=text_ids(5))
    with torch.no_grad():
        assert (mmdit(**default_ids).sample - actual).abs().max() > 1e-3  # the ids matter


def test_fused_qkv_matches_flux_and_keeps_the_state_dict():
    flux = make_flux()
    mmdit = MMDiTTransformer2DModel.from_flux(flux)
    keys = sorted(mmdit.state_dict())
    mmdit.fuse_qkv_projections()
    assert mmdit.single_transformer_blocks[0].attn.fused_projections
    assert_parity(flux, mmdit, *flux_inputs(flux, batch=3))
    assert sorted(mmdit.state_dict()) == keys
    assert_state_dicts_equal(mmdit.to_flux().state_dict(), flux.state_dict())


def test_training_mode_outputs_and_gradients_match_flux():
    flux = make_flux()
    mmdit = MMDiTTransformer2DModel.from_flux(flux)
    ours, theirs = flux_inputs(flux)
    height, width = ours["hidden_states"].shape[-2:]
    expected = unpatchify(flux.train()(**theirs).sample, 2, height, width)
    actual = mmdit.train()(**ours).sample
    assert (actual - expected).abs().max().item() <= TOLERANCE
    expected.square().mean().backward()
    actual.square().mean().backward()
    # the guidance embedder's gradient depends on everything downstream of the conditioning vector
    flux_grad = flux.time_text_embed.guidance_embedder.linear_1.weight.grad
    our_grad = mmdit.guidance_mlp.linear_1.weight.grad
    assert (our_grad - flux_grad).abs().max().item() <= 1e-4 * flux_grad.abs().max().item()


def test_diffusers_flux_processor_runs_on_our_attention_modules():
    """Every attention of a converted FLUX model takes diffusers' own FLUX processor and gives the same result."""
    flux = make_flux()
    mmdit = MMDiTTransformer2DModel.from_flux(flux)
    assert any(name.startswith("single_transformer_blocks.") for name in mmdit.attn_processors)
    mmdit.set_attn_processor(FluxAttnProcessor())
    assert_parity(flux, mmdit, *flux_inputs(flux))


# ----------------------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", CONFIGS.values(), ids=CONFIGS.keys())
def test_round_trip_reproduces_the_flux_state_dict(options):
    flux = make_flux(**options)
    back = MMDiTTransformer2DModel.from_flux(flux).to_flux()
    assert isinstance(back, FluxTransformer2DModel)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(back.config) == public(flux.config)
    assert_state_dicts_equal(back.state_dict(), flux.state_dict())


def test_mmdit_to_flux_and_back_reproduces_the_mmdit_state_dict():
    torch.manual_seed(0)
    mmdit = MMDiTTransformer2DModel(
        img_dim=16, txt_dim=24, cond_dim=20, img_tokens=16, txt_tokens=20, hidden_size=32, depth=2, num_heads=2,
        num_single_layers=2, pos_embed_type="rope", axes_dims_rope=(4, 6, 6), qk_norm="rms_norm",
        txt_pre_only_last_block=False, guidance_embeds=True,
    )
    with torch.no_grad():
        for param in mmdit.parameters():
            param.normal_(0, 0.2)
    flux = mmdit.to_flux().eval()
    again = MMDiTTransformer2DModel.from_flux(flux)
    assert_state_dicts_equal(again.state_dict(), mmdit.state_dict())
    assert_parity(flux, mmdit.eval(), *flux_inputs(flux, height=8, width=8))


def test_converted_config_describes_the_flux_model():
    cfg = MMDiTTransformer2DModel.from_flux(make_flux(in_channels=32, out_channels=16)).config
    assert (cfg.depth, cfg.num_single_layers, cfg.num_heads, cfg.hidden_size) == (2, 2, 2, 32)
    assert (cfg.patch_size, cfg.img_dim, cfg.in_channels, cfg.out_channels) == (2, 32, 8, 4)
    assert (cfg.txt_dim, cfg.cond_dim, cfg.txt_tokens) == (24, 20, 512)
    assert cfg.pos_embed_type == "rope" and tuple(cfg.axes_dims_rope) == (4, 6, 6) and cfg.rope_theta == 10000
    assert cfg.guidance_embeds is True and cfg.qk_norm == "rms_norm" and cfg.txt_pre_only_last_block is False


def test_conversion_from_a_saved_diffusers_folder(tmp_path):
    flux = make_flux()
    flux.save_pretrained(tmp_path / "pipe" / "transformer")
    mmdit = MMDiTTransformer2DModel.from_flux(tmp_path / "pipe", subfolder="transformer")
    assert_parity(flux, mmdit, *flux_inputs(flux))
    mmdit = MMDiTTransformer2DModel.from_flux(str(tmp_path / "pipe" / "transformer"))
    assert_parity(flux, mmdit, *flux_inputs(flux))


def test_converted_model_saves_and_loads_as_our_own(tmp_path):
    flux = make_flux()
    MMDiTTransformer2DModel.from_flux(flux).save_pretrained(tmp_path / "ours")
    assert_parity(flux, MMDiTTransformer2DModel.from_pretrained(tmp_path / "ours"), *flux_inputs(flux))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_checkpoints_convert_exactly_and_compute_like_flux(dtype, tmp_path):
    make_flux().to(dtype).save_pretrained(tmp_path / "flux")
    flux = FluxTransformer2DModel.from_pretrained(tmp_path / "flux", torch_dtype=dtype).eval()
    mmdit = MMDiTTransformer2DModel.from_flux(tmp_path / "flux", torch_dtype=dtype)
    assert {p.dtype for p in mmdit.parameters()} == {dtype}
    back = mmdit.to_flux()
    assert {p.dtype for p in back.parameters()} == {dtype}
    assert_state_dicts_equal(back.state_dict(), flux.state_dict())
    ours, theirs = flux_inputs(flux)
    # FLUX multiplies sigma and guidance by 1000 in the model's dtype (bf16 rounds sigma = 0.72 to 0.7227, then
    # 722.7 to 724); ours gets the timestep in [0, 1000] as a scheduler gives it. Values that both represent
    # exactly compare the computation, not that rounding.
    exact = dict(timestep=torch.tensor([0.5, 0.25]), guidance=torch.tensor([1.0, 2.0]))
    theirs.update(exact)
    ours.update(exact, timestep=exact["timestep"] * 1000)
    half = ("hidden_states", "encoder_hidden_states", "pooled_projections")
    cast = lambda kwargs: {k: v.to(dtype) if k in half else v for k, v in kwargs.items()}  # noqa: E731
    expected, actual = outputs(flux, mmdit, cast(ours), cast(theirs))
    assert actual.dtype == expected.dtype == dtype and torch.isfinite(actual).all()
    # the two differ only in where each rounds to half precision (measured: 0.1% of the largest output in fp16,
    # 0.9% in bf16)
    relative = {torch.float16: 0.005, torch.bfloat16: 0.03}[dtype]
    assert (actual.float() - expected.float()).abs().max() <= relative * expected.float().abs().max()


def test_from_flux_refuses_a_missing_tensor(monkeypatch):
    flux = make_flux()
    state = dict(flux.state_dict())
    del state["single_transformer_blocks.1.proj_mlp.weight"]
    monkeypatch.setattr(flux, "state_dict", lambda *args, **kwargs: state)
    with pytest.raises(ValueError, match=r"missing \['single_transformer_blocks\.1\.proj_mlp\.weight'\]"):
        MMDiTTransformer2DModel.from_flux(flux)


def test_from_flux_refuses_an_unexpected_tensor(monkeypatch):
    flux = make_flux(guidance_embeds=False)
    state = {**flux.state_dict(), "time_text_embed.guidance_embedder.linear_1.weight": torch.zeros(32, 256)}
    monkeypatch.setattr(flux, "state_dict", lambda *args, **kwargs: state)
    with pytest.raises(ValueError, match=r"unexpected \['guidance_mlp\.linear_1\.weight'\]"):
        MMDiTTransformer2DModel.from_flux(flux)


def test_from_flux_refuses_a_tensor_with_no_counterpart(monkeypatch):
    flux = make_flux()
    state = {**flux.state_dict(), "transformer_blocks.0.attn.bogus.weight": torch.zeros(1)}
    monkeypatch.setattr(flux, "state_dict", lambda *args, **kwargs: state)
    with pytest.raises(ValueError, match=re.escape("no counterpart: ['transformer_blocks.0.attn.bogus.weight']")):
        MMDiTTransformer2DModel.from_flux(flux)


def test_from_flux_refuses_other_objects():
    with pytest.raises(TypeError, match=r"FluxTransformer2DModel or a folder path; got dict"):
        MMDiTTransformer2DModel.from_flux({})


def test_to_flux_refuses_an_sd3_style_model():
    mmdit = MMDiTTransformer2DModel.from_preset("tiny")
    with pytest.raises(ValueError, match=r"FLUX has no equivalent of `pos_embed_type`='sincos'"):
        mmdit.to_flux()


# ----------------------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, guidance_embeds", [("flux.1-dev", True), ("flux.1-schnell", False)])
def test_flux_presets_are_fluxs_published_transformers(name, guidance_embeds):
    """FluxTransformer2DModel's defaults are FLUX.1's published config; built on the meta device, the preset has
    exactly its parameters, and converts to that config."""
    with torch.device("meta"):
        ours = MMDiTTransformer2DModel.from_preset(name)
        flux = FluxTransformer2DModel(guidance_embeds=guidance_embeds)
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    assert count(ours) == count(flux) > 11_000_000_000
    config = {**ours.config, "out_channels": ours.out_channels}
    assert conversion.mmdit_config_to_flux(config) == {k: v for k, v in flux.config.items() if not k.startswith("_")}
    assert {k: PRESETS[name][k] for k in PRESETS[name]} == {k: ours.config[k] for k in PRESETS[name]}


# ----------------------------------------------------------------------------------------------------------
# Text padding masks
# ----------------------------------------------------------------------------------------------------------
def test_converted_flux_weights_get_no_mask_by_default_as_in_diffusers():
    """FLUX was trained attending to padded text and diffusers passes no mask: the converted model says so
    (`use_text_attention_mask=False`, so pipelines pass none), and without one it equals FLUX on padded text."""
    flux = make_flux()
    mmdit = MMDiTTransformer2DModel.from_flux(flux)
    assert mmdit.config.use_text_attention_mask is False
    assert not uses_text_mask(type("Pipe", (), {"transformer": mmdit})())
    ours, theirs = flux_inputs(flux, txt_len=9)
    for kwargs in (ours, theirs):
        kwargs["encoder_hidden_states"][:, 4:] = 0.0  # zero padding after 4 real tokens, as a tokenizer pads
    assert_parity(flux, mmdit, ours, theirs)


@pytest.mark.parametrize("padded_to", [6, 9, 16])
def test_with_the_mask_the_output_does_not_depend_on_padding_length(padded_to):
    flux = make_flux()
    mmdit = MMDiTTransformer2DModel.from_flux(flux)
    ours, _ = flux_inputs(flux, batch=2, txt_len=16)
    real = [4, 5]  # different in each prompt: the mask reaches the attention, not only the dropping
    text = ours["encoder_hidden_states"]
    reference = []
    with torch.no_grad():
        for i, n in enumerate(real):
            alone = {k: v[i : i + 1] for k, v in ours.items()}
            reference.append(mmdit(**dict(alone, encoder_hidden_states=text[i : i + 1, :n])).sample)
        mask = torch.tensor([[1] * n + [0] * (padded_to - n) for n in real])
        padded = mmdit(**dict(ours, encoder_hidden_states=text[:, :padded_to], encoder_attention_mask=mask)).sample
        unmasked = mmdit(**dict(ours, encoder_hidden_states=text[:, :padded_to])).sample
    assert (padded - torch.cat(reference)).abs().max() <= TOLERANCE
    assert (unmasked - torch.cat(reference)).abs().max() > 1e-3  # without the mask the padding is attended to


def test_mask_shared_padding_is_dropped_together_with_its_text_ids():
    flux = make_flux()
    mmdit = MMDiTTransformer2DModel.from_flux(flux)
    ours, _ = flux_inputs(flux, batch=2, txt_len=8)
    txt_ids = torch.arange(24.0).reshape(8, 3)
    mask = torch.tensor([[1] * 5 + [0] * 3] * 2)  # the last 3 positions are padding everywhere: dropped
    with torch.no_grad():
        dropped = mmdit(**ours, txt_ids=txt_ids, encoder_attention_mask=mask).sample
        short = dict(ours, encoder_hidden_states=ours["encoder_hidden_states"][:, :5])
        expected = mmdit(**short, txt_ids=txt_ids[:5]).sample
    assert (dropped - expected).abs().max() <= TOLERANCE


# ----------------------------------------------------------------------------------------------------------
# Our features on FLUX-style configs
# ----------------------------------------------------------------------------------------------------------
def test_gradient_checkpointing_gives_the_same_output_and_gradients():
    mmdit = MMDiTTransformer2DModel.from_flux(make_flux()).train()
    ours, _ = flux_inputs(make_flux())

    def step():
        mmdit.zero_grad(set_to_none=True)
        out = mmdit(**ours).sample
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in mmdit.named_parameters()}

    plain_out, plain_grads = step()
    mmdit.enable_gradient_checkpointing()
    ckpt_out, ckpt_grads = step()
    assert torch.equal(plain_out, ckpt_out)
    assert any(n.startswith("single_transformer_blocks.") for n in ckpt_grads)
    assert all(torch.allclose(plain_grads[n], ckpt_grads[n], atol=1e-6) for n in plain_grads)


def test_lora_on_fluxs_module_names_trains_and_scales():
    from peft import LoraConfig

    mmdit = MMDiTTransformer2DModel.from_flux(make_flux())
    ours, _ = flux_inputs(make_flux())
    with torch.no_grad():
        base = mmdit(**ours).sample
    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "to_add_out", "proj_mlp", "proj_out", "norm.linear"]
    mmdit.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=targets, init_lora_weights=False))
    names = [n for n, p in mmdit.named_parameters() if p.requires_grad]
    for module in ("single_transformer_blocks.1.proj_mlp", "single_transformer_blocks.0.attn.to_k",
                   "single_transformer_blocks.0.norm.linear", "transformer_blocks.1.attn.add_q_proj"):
        assert any(n.startswith(module + ".lora_A") for n in names), module
    with torch.no_grad():
        adapted = mmdit(**ours).sample
        unscaled = mmdit(**ours, joint_attention_kwargs={"scale": 0.0}).sample
    assert (adapted - base).abs().max() > 1e-3
    assert (unscaled - base).abs().max() <= TOLERANCE


def test_compiled_flux_style_model_matches_eager():
    torch._dynamo.reset()
    flux = make_flux(num_layers=1, num_single_layers=1)
    mmdit = MMDiTTransformer2DModel.from_flux(flux)
    ours, _ = flux_inputs(flux)
    compiled = torch.compile(mmdit, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert (compiled(**ours).sample - mmdit(**ours).sample).abs().max() <= TOLERANCE
    torch._dynamo.reset()


def test_cpu_bf16_kernels_reach_the_single_stream_attention():
    from mmdit_diffusers.cpu_bf16 import BF16ViaFP32AttnProcessor, use_fp32_kernels_for_bf16

    flux = make_flux()
    mmdit = MMDiTTransformer2DModel.from_flux(flux)
    ours, _ = flux_inputs(flux)
    with torch.no_grad():
        reference = mmdit(**ours).sample
    use_fp32_kernels_for_bf16(mmdit.to(torch.bfloat16))
    assert all(isinstance(block.attn.processor, BF16ViaFP32AttnProcessor) for block in mmdit.single_transformer_blocks)
    half = ("hidden_states", "encoder_hidden_states", "pooled_projections")
    with torch.no_grad():
        out = mmdit(**{k: v.to(torch.bfloat16) if k in half else v for k, v in ours.items()}).sample
    assert out.dtype == torch.bfloat16
    assert (out.float() - reference).abs().max() <= 0.05 * reference.abs().max()


def test_first_block_cache_computes_what_it_computes_on_flux():
    """diffusers' First Block Cache, the same config on both: the second call, barely changed, runs the first
    block only and reuses the other blocks' (single-stream ones included) residuals, on ours as on FLUX."""
    from diffusers import FirstBlockCacheConfig

    flux = make_flux()
    mmdit = MMDiTTransformer2DModel.from_flux(flux)
    ours, theirs = flux_inputs(flux)
    near_ours = dict(ours, hidden_states=ours["hidden_states"] + 1e-3)
    near_theirs = dict(theirs, hidden_states=theirs["hidden_states"] + 1e-3)
    exact_near = outputs(flux, mmdit, near_ours, near_theirs)[1]
    height, width = ours["hidden_states"].shape[-2:]
    cached = {}
    for model, first, near in ((flux, theirs, near_theirs), (mmdit, ours, near_ours)):
        model.enable_cache(FirstBlockCacheConfig(threshold=1e9))  # never recompute after the first call
        with torch.no_grad():
            with model.cache_context("cond"):
                model(**first)
            with model.cache_context("cond"):
                cached[model] = model(**near).sample
        model.disable_cache()
    assert (cached[mmdit] - unpatchify(cached[flux], 2, height, width)).abs().max() <= TOLERANCE
    assert (cached[mmdit] - exact_near).abs().max() > 1e-6  # the cached blocks were not rerun


def test_compile_repeated_blocks_compiles_both_kinds_of_block():
    flux = make_flux(num_layers=1, num_single_layers=2)
    mmdit = MMDiTTransformer2DModel.from_flux(flux)
    mmdit.compile_repeated_blocks(backend="eager", fullgraph=True)
    blocks = [*mmdit.transformer_blocks, *mmdit.single_transformer_blocks]
    assert all(block._compiled_call_impl is not None for block in blocks)
    assert_parity(flux, mmdit, *flux_inputs(flux))
    torch._dynamo.reset()
