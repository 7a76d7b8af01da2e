"""Specification of `MMDiTTransformer2DModel`: shapes, initialisation, masking, serialisation, training
features (gradient checkpointing, fused QKV, LoRA), torch.compile and reduced precision.

Every model here is tiny (hidden 32, depth <= 2) so the whole file runs in seconds on a CPU.
"""

from __future__ import annotations

import json

import pytest
import torch

from mmdit_diffusers import PRESETS, MMDiTTransformer2DModel, paper_preset
from mmdit_diffusers.models.embeddings import patchify, token_grid

# A tiny model whose token grid is not square: 12 tokens are read on a 3 x 4 patch grid, i.e. latents 6 x 8.
TINY = dict(
    img_dim=16,  # in_channels 4 * patch_size 2 ** 2
    txt_dim=8,
    cond_dim=12,
    img_tokens=12,
    txt_tokens=16,
    hidden_size=32,
    depth=2,
    num_heads=2,
    patch_size=2,
)
IN_CHANNELS = 4
TXT_LEN = 7


def build(seed: int = 0, randomize: bool = True, **overrides) -> MMDiTTransformer2DModel:
    """A tiny model; `randomize` redraws every parameter from N(0, 0.2) so the output is far from trivial
    (a fresh model outputs zeros by design)."""
    torch.manual_seed(seed)
    model = MMDiTTransformer2DModel(**{**TINY, **overrides})
    if randomize:
        with torch.no_grad():
            for param in model.parameters():
                param.normal_(0, 0.2)
    return model.eval()


def inputs(model: MMDiTTransformer2DModel, batch: int = 2, txt_len: int = TXT_LEN, seed: int = 1, latents=None):
    """Keyword arguments of a forward: token-level hidden states unless `latents=(H, W)`."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    if latents is None:
        hidden = torch.randn(batch, cfg.img_tokens, cfg.img_dim, generator=g)
    else:
        hidden = torch.randn(batch, model.in_channels, *latents, generator=g)
    return dict(
        hidden_states=hidden,
        encoder_hidden_states=torch.randn(batch, txt_len, cfg.txt_dim, generator=g),
        pooled_projections=torch.randn(batch, cfg.cond_dim or cfg.hidden_size, generator=g),
        timestep=torch.rand(batch, generator=g) * 1000,
    )


def run(model, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**kwargs).sample


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture
def model() -> MMDiTTransformer2DModel:
    return build()


# ----------------------------------------------------------------------------------------------------------
# Construction
# ----------------------------------------------------------------------------------------------------------
def expected_num_parameters(img_dim, txt_dim, hidden_size, depth, out_dim, cond_dim=None, mlp_ratio=4):
    """Parameters of the MMDiT as the paper describes it, counted by hand (no qk-norm, no dual attention).
    The last block's text stream is pre-only (the default): modulation to 2 vectors and QKV, nothing after."""
    d, h = hidden_size, int(hidden_size * mlp_ratio)
    cond_dim = cond_dim or d
    linear = lambda i, o: i * o + o  # noqa: E731
    stream = linear(d, 6 * d) + 3 * linear(d, d) + linear(d, d) + linear(d, h) + linear(h, d)
    embedders = linear(img_dim, d) + linear(txt_dim, d)  # x_embedder, context_embedder
    embedders += linear(256, d) + linear(d, d) + linear(cond_dim, d) + linear(d, d)  # timestep, pooled-text MLPs
    final = linear(d, 2 * d) + linear(d, out_dim)
    pre_only_text_stream = linear(d, 2 * d) + 3 * linear(d, d)
    return embedders + (2 * depth - 1) * stream + pre_only_text_stream + final


def test_reference_configuration_builds_on_meta_device():
    with torch.device("meta"):
        model = MMDiTTransformer2DModel(
            img_dim=16, txt_dim=4096, hidden_size=1536, depth=24, num_heads=24, img_tokens=256, txt_tokens=77
        )
    cfg = model.config
    assert (cfg.img_dim, cfg.txt_dim, cfg.hidden_size, cfg.depth, cfg.num_heads) == (16, 4096, 1536, 24, 24)
    assert (cfg.img_tokens, cfg.txt_tokens) == (256, 77)
    assert len(model.transformer_blocks) == 24
    assert model.in_channels == 16 // 2**2 and model.out_channels == model.in_channels
    assert model.img_grid == (16, 16)
    assert all(p.device.type == "meta" for p in model.parameters())

    count = sum(p.numel() for p in model.parameters())
    assert count == expected_num_parameters(16, 4096, 1536, 24, out_dim=16)
    assert 1.9e9 < count < 2.2e9  # the paper's depth-24 model is ~2B parameters


def test_recommended_defaults_build_a_model():
    defaults = MMDiTTransformer2DModel.recommended_defaults()
    assert {"hidden_size", "depth", "num_heads"} <= defaults.keys()
    assert "img_dim" not in defaults and "txt_dim" not in defaults
    defaults["depth"] = -1  # a copy: changing it does not change the next call
    assert MMDiTTransformer2DModel.recommended_defaults()["depth"] > 0
    with torch.device("meta"):
        model = MMDiTTransformer2DModel(img_dim=16, txt_dim=32, **MMDiTTransformer2DModel.recommended_defaults())
    for name, value in MMDiTTransformer2DModel.recommended_defaults().items():
        assert model.config[name] == value


def test_tiny_preset_builds_and_runs():
    model = MMDiTTransformer2DModel.from_preset("tiny")
    for name, value in PRESETS["tiny"].items():
        assert model.config[name] == value
    out = run(model, **inputs(model, txt_len=3))
    assert out.shape == (2, model.config.img_tokens, model.output_size())


def test_preset_overrides_apply():
    model = MMDiTTransformer2DModel.from_preset("tiny", depth=1, qk_norm="rms_norm")
    assert model.config.depth == 1 and len(model.transformer_blocks) == 1
    assert model.config.qk_norm == "rms_norm"


def test_sd3_presets_match_the_published_sizes():
    medium, large = PRESETS["sd3-medium"], PRESETS["sd3.5-large"]
    assert (medium["depth"], medium["hidden_size"], medium["num_heads"]) == (24, 1536, 24)
    assert (large["depth"], large["hidden_size"], large["num_heads"]) == (38, 2432, 38)
    assert large["qk_norm"] == "rms_norm"
    for preset in (medium, large, PRESETS["sd3.5-medium"]):
        assert preset["img_dim"] == preset["in_channels"] * preset["patch_size"] ** 2
        assert preset["in_channels"] == 16 and preset["txt_dim"] == 4096 and preset["cond_dim"] == 2048


@pytest.mark.parametrize("depth", [2, 15, 24, 38])
def test_paper_preset_scales_width_and_heads_with_depth(depth):
    preset = paper_preset(depth)
    assert preset["depth"] == depth
    assert preset["hidden_size"] == 64 * depth
    assert preset["num_heads"] == depth


def test_output_size_is_out_channels_times_patch_area():
    assert build(randomize=False).output_size() == IN_CHANNELS * 2**2
    assert build(randomize=False, out_channels=6).output_size() == 6 * 2**2
    assert build(randomize=False, img_dim=4, patch_size=1).output_size() == 4


# ----------------------------------------------------------------------------------------------------------
# Forward contract
# ----------------------------------------------------------------------------------------------------------
def test_token_level_forward_shapes(model):
    out = run(model, **inputs(model, batch=3))
    assert out.shape == (3, TINY["img_tokens"], TINY["img_dim"])
    assert torch.isfinite(out).all()


def test_latent_level_forward_shapes_non_square():
    model = build(out_channels=6)
    out = run(model, **inputs(model, batch=2, latents=(4, 8)))
    assert out.shape == (2, 6, 4, 8)
    out = run(model, **inputs(model, batch=2, latents=(8, 2)))
    assert out.shape == (2, 6, 8, 2)


def test_token_level_equals_latent_level_on_the_token_grid(model):
    rows, cols = token_grid(model.config.img_tokens)
    assert (rows, cols) == (3, 4)
    p = model.config.patch_size
    kwargs = inputs(model, latents=(rows * p, cols * p))
    latent_out = run(model, **kwargs)
    token_out = run(model, **{**kwargs, "hidden_states": patchify(kwargs["hidden_states"], p)})
    assert token_out.shape == (2, model.config.img_tokens, model.config.img_dim)
    assert max_diff(token_out, patchify(latent_out, p)) <= 1e-6


def test_scalar_timestep_is_broadcast_over_the_batch(model):
    kwargs = inputs(model)
    kwargs["timestep"] = torch.full((2,), 250.0)
    expected = run(model, **kwargs)
    assert max_diff(run(model, **{**kwargs, "timestep": torch.tensor(250.0)}), expected) == 0


def test_return_dict_false_gives_a_tuple(model):
    kwargs = inputs(model)
    with torch.no_grad():
        result = model(**kwargs, return_dict=False)
    assert isinstance(result, tuple) and len(result) == 1
    assert torch.equal(result[0], run(model, **kwargs))


# ----------------------------------------------------------------------------------------------------------
# Initialisation (AdaLN-Zero)
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("latents", [None, (6, 8)])
def test_fresh_model_outputs_exact_zeros(latents):
    model = build(randomize=False)
    out = run(model, **inputs(model, latents=latents))
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize(
    "options", [{}, {"qk_norm": "rms_norm", "dual_attention_layers": (0, 1)}, {"txt_pre_only_last_block": False}]
)
def test_fresh_blocks_are_the_identity(options):
    model = build(randomize=False, **options)
    g = torch.Generator().manual_seed(3)
    img = torch.randn(2, 12, 32, generator=g)
    txt = torch.randn(2, 5, 32, generator=g)
    vec = torch.randn(2, 32, generator=g)
    with torch.no_grad():
        for i, block in enumerate(model.transformer_blocks):
            img_out, txt_out = block(img, txt, vec)
            assert torch.equal(img_out, img)
            assert torch.equal(txt_out, txt)  # a pre-only block (the last by default) returns its text input


# ----------------------------------------------------------------------------------------------------------
# Text attention mask
# ----------------------------------------------------------------------------------------------------------
def padding_mask(lengths: list[int], total: int) -> torch.Tensor:
    return (torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]).long()


# "shared": every prompt has the same padding; "per-sample": the prompts' real lengths differ.
@pytest.mark.parametrize("lengths", [[4, 4], [4, TXT_LEN]], ids=["shared", "per-sample"])
def test_masked_padding_does_not_affect_the_output(model, lengths):
    kwargs = inputs(model)
    mask = padding_mask(lengths, TXT_LEN)
    perturbed = kwargs["encoder_hidden_states"].clone()
    perturbed[mask == 0] += 10 * torch.randn_like(perturbed[mask == 0])

    masked = run(model, **kwargs, encoder_attention_mask=mask)
    masked_perturbed = run(model, **{**kwargs, "encoder_hidden_states": perturbed}, encoder_attention_mask=mask)
    assert max_diff(masked, masked_perturbed) <= 1e-6

    unmasked = run(model, **kwargs)
    unmasked_perturbed = run(model, **{**kwargs, "encoder_hidden_states": perturbed})
    assert max_diff(unmasked, unmasked_perturbed) > 1e-3


def test_all_ones_mask_equals_no_mask(model):
    kwargs = inputs(model)
    ones = torch.ones(2, TXT_LEN, dtype=torch.long)
    assert max_diff(run(model, **kwargs, encoder_attention_mask=ones), run(model, **kwargs)) <= 1e-6


def test_boolean_and_integer_masks_agree(model):
    kwargs = inputs(model)
    mask = padding_mask([3, 5], TXT_LEN)
    as_bool = run(model, **kwargs, encoder_attention_mask=mask.bool())
    assert max_diff(as_bool, run(model, **kwargs, encoder_attention_mask=mask)) == 0


def test_per_sample_masks_match_each_sample_alone_without_padding(model):
    """In float64, so that the only difference left would be the mask's (float32 rounding of a softmax over a
    different number of keys reaches 1e-5 on these outputs of size ~5)."""
    model = model.double()
    lengths = [2, 5, TXT_LEN]
    kwargs = {k: v.double() for k, v in inputs(model, batch=3).items()}
    batched = run(model, **kwargs, encoder_attention_mask=padding_mask(lengths, TXT_LEN))
    for i, length in enumerate(lengths):
        alone = run(
            model,
            hidden_states=kwargs["hidden_states"][i : i + 1],
            encoder_hidden_states=kwargs["encoder_hidden_states"][i : i + 1, :length],
            pooled_projections=kwargs["pooled_projections"][i : i + 1],
            timestep=kwargs["timestep"][i : i + 1],
        )
        assert max_diff(batched[i : i + 1], alone) <= 1e-12


def test_masked_padding_works_with_a_pre_only_last_text_stream():
    model = build(txt_pre_only_last_block=True)
    kwargs = inputs(model)
    mask = padding_mask([3, 6], TXT_LEN)
    perturbed = kwargs["encoder_hidden_states"].clone()
    perturbed[mask == 0] = 100.0
    expected = run(model, **kwargs, encoder_attention_mask=mask)
    actual = run(model, **{**kwargs, "encoder_hidden_states": perturbed}, encoder_attention_mask=mask)
    assert max_diff(actual, expected) <= 1e-6


# ----------------------------------------------------------------------------------------------------------
# Serialisation
# ----------------------------------------------------------------------------------------------------------
def test_save_and_load_round_trip_is_bit_identical(tmp_path):
    model = build(qk_norm="rms_norm", dual_attention_layers=(1,), out_channels=6)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == "MMDiTTransformer2DModel"

    loaded = MMDiTTransformer2DModel.from_pretrained(tmp_path).eval()
    as_json = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731 (JSON stores tuples as lists)
    for key, value in model.config.items():
        if not key.startswith("_"):
            assert as_json(loaded.config[key]) == as_json(value), key
    expected, actual = model.state_dict(), loaded.state_dict()
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    kwargs = inputs(model, latents=(6, 4))
    assert torch.equal(run(loaded, **kwargs), run(model, **kwargs))


def test_position_table_is_not_saved(model):
    assert not any("pos_embed" in key for key in model.state_dict())


# ----------------------------------------------------------------------------------------------------------
# Training features
# ----------------------------------------------------------------------------------------------------------
def grads(model, kwargs) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    out = model(**kwargs).sample
    (out**2).mean().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_every_parameter_gets_a_gradient_when_the_last_text_stream_is_pre_only():
    model = build(txt_pre_only_last_block=True, qk_norm="rms_norm", dual_attention_layers=(1,)).train()
    received = grads(model, inputs(model, latents=(6, 8)))
    assert received.keys() == {name for name, _ in model.named_parameters()}


def test_without_pre_only_last_block_the_last_text_outputs_get_no_gradient():
    """The last block's text-stream output path (attn.to_add_out, txt.mlp) feeds nothing: the image output never reads it.
    `txt_pre_only_last_block=True` removes those parameters (needed e.g. for DDP without
    find_unused_parameters)."""
    model = build(txt_pre_only_last_block=False).train()
    received = grads(model, inputs(model))
    last = f"transformer_blocks.{model.config.depth - 1}."
    unused = {name for name, _ in model.named_parameters()} - received.keys()
    assert unused and all(name.startswith((last + "attn.to_add_out.", last + "txt.mlp.")) for name in unused)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = build(dual_attention_layers=(0,), txt_pre_only_last_block=True).train()
    kwargs = inputs(model, latents=(6, 8))
    kwargs["encoder_attention_mask"] = padding_mask([4, TXT_LEN], TXT_LEN)
    expected = grads(model, kwargs)

    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    calls = []
    checkpoint = model._gradient_checkpointing_func
    model._gradient_checkpointing_func = lambda block, *args: calls.append(block) or checkpoint(block, *args)
    actual = grads(model, kwargs)

    assert len(calls) == model.config.depth  # every block ran through the checkpoint function
    assert expected.keys() == actual.keys() and len(expected) == len(list(model.parameters()))
    for name in expected:
        assert max_diff(expected[name], actual[name]) <= 1e-5, name


FUSED_OPTIONS = dict(qk_norm="rms_norm", dual_attention_layers=(0, 1))


def test_fused_qkv_gives_the_same_output():
    model = build(**FUSED_OPTIONS)
    kwargs = inputs(model)
    mask = padding_mask([3, TXT_LEN], TXT_LEN)
    expected, expected_masked = run(model, **kwargs), run(model, **kwargs, encoder_attention_mask=mask)
    model.fuse_qkv_projections()
    assert any(n.endswith("to_qkv.weight") for n, _ in model.named_parameters())
    assert not any(n.endswith("to_q.weight") for n, _ in model.named_parameters())
    assert max_diff(run(model, **kwargs), expected) <= 1e-5
    assert max_diff(run(model, **kwargs, encoder_attention_mask=mask), expected_masked) <= 1e-5
    model.unfuse_qkv_projections()
    assert max_diff(run(model, **kwargs), expected) <= 1e-5


def test_fused_state_dict_has_unfused_names_and_loads_into_unfused_model():
    unfused = build(**FUSED_OPTIONS)
    fused = build(**FUSED_OPTIONS)
    fused.fuse_qkv_projections()
    state = fused.state_dict()
    assert state.keys() == unfused.state_dict().keys()

    fresh = build(seed=5, **FUSED_OPTIONS)
    fresh.load_state_dict(state, strict=True)
    kwargs = inputs(fresh)
    assert max_diff(run(fresh, **kwargs), run(fused, **kwargs)) <= 1e-5


def test_fused_model_loads_an_unfused_state_dict():
    source = build(**FUSED_OPTIONS)
    target = build(seed=5, **FUSED_OPTIONS)
    target.fuse_qkv_projections()
    target.load_state_dict(source.state_dict(), strict=True)
    kwargs = inputs(source)
    assert max_diff(run(target, **kwargs), run(source, **kwargs)) <= 1e-5


def test_fused_model_trains():
    model = build(**FUSED_OPTIONS).train()
    model.fuse_qkv_projections()
    kwargs = inputs(model)
    before = run(model, **kwargs)
    fused_grads = {n: g for n, g in grads(model, kwargs).items() if n.endswith("to_qkv.weight")}
    qkv_count = sum(1 for n, _ in model.named_parameters() if n.endswith("to_qkv.weight"))
    assert len(fused_grads) == qkv_count > 0
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in fused_grads.values())
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert max_diff(run(model, **kwargs), before) > 0


# ----------------------------------------------------------------------------------------------------------
# torch.compile (aot_eager: traces the whole model through dynamo and AOTAutograd, as inductor would,
# without the minutes of C++ compilation inductor takes on a CPU)
# ----------------------------------------------------------------------------------------------------------
def test_compiled_model_matches_eager_with_and_without_mask():
    torch._dynamo.reset()
    model = build(depth=1)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    kwargs = inputs(model)
    mask = padding_mask([3, TXT_LEN], TXT_LEN)  # the padding-dropping path is skipped when compiling
    assert max_diff(run(compiled, **kwargs), run(model, **kwargs)) <= 1e-5
    masked = run(compiled, **kwargs, encoder_attention_mask=mask)
    assert max_diff(masked, run(model, **kwargs, encoder_attention_mask=mask)) <= 1e-5
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------------------
# Reduced precision
# ----------------------------------------------------------------------------------------------------------
def test_bfloat16_autocast_is_finite_and_close_to_float32(model):
    kwargs = inputs(model, latents=(6, 8))
    reference = run(model, **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(model, **kwargs)
    assert torch.isfinite(out).all()
    assert max_diff(out, reference) <= 0.1 * reference.abs().max().item()


def test_bfloat16_weights_are_finite_and_close_to_float32(model):
    kwargs = inputs(model, latents=(6, 8))
    reference = run(model, **kwargs)
    model.to(torch.bfloat16)
    # timesteps stay float32, as a scheduler gives them: bfloat16 cannot even hold 999.0 (it rounds to 1000)
    out = run(model, **{k: v if k == "timestep" else v.to(torch.bfloat16) for k, v in kwargs.items()})
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    assert max_diff(out, reference) <= 0.1 * reference.abs().max().item()


# ----------------------------------------------------------------------------------------------------------
# LoRA (peft, through diffusers' PeftAdapterMixin)
# ----------------------------------------------------------------------------------------------------------
# both streams' attention projections (SD3's names) and MLPs
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "fc1", "fc2"]


def lora_config(**kwargs):
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, **kwargs)


def base_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}


# A layer wrapped by PEFT computes its base product with PyTorch's float32 kernel, the bare layer with oneDNN's on
# CPUs with bfloat16 units (models/fused_ops.py): the same output up to float32 rounding (outputs here are ~5, one
# unit in the last place ~5e-7), well apart from what a LoRA adds (> 1e-4).
LORA_OFF_TOLERANCE = 1e-5


def test_lora_training_step_changes_output_and_not_base_weights(model):
    kwargs = inputs(model)
    base_out = run(model, **kwargs)
    model.add_adapter(lora_config(), adapter_name="a")
    assert max_diff(run(model, **kwargs), base_out) <= LORA_OFF_TOLERANCE  # lora_B starts at zero
    base_before = base_state(model)

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, _ in trainable)
    assert any(".fc1." in n for n, _ in trainable) and any(".to_out." in n for n, _ in trainable)
    model.train()
    optimizer = torch.optim.SGD([p for _, p in trainable], lr=0.5)
    (model(**kwargs).sample ** 2).mean().backward()
    optimizer.step()

    assert max_diff(run(model.eval(), **kwargs), base_out) > 1e-4
    base_after = base_state(model)
    assert base_before.keys() == base_after.keys()
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before)


def test_lora_save_and_load_round_trip(model, tmp_path):
    base = base_state(model)
    model.add_adapter(lora_config(init_lora_weights=False), adapter_name="a")
    kwargs = inputs(model)
    expected = run(model, **kwargs)
    model.save_lora_adapter(tmp_path, adapter_name="a")
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()

    fresh = build(seed=9)
    fresh.load_state_dict(base)
    assert max_diff(run(fresh, **kwargs), expected) > 1e-4
    # diffusers 0.42: save_lora_adapter writes the model's own key names, but load_lora_adapter's default
    # prefix="transformer" is for pipeline-level files (so prefix=None), and it looks for the pickled
    # .bin file unless told the safetensors name (or use_safetensors=True).
    fresh.load_lora_adapter(tmp_path, prefix=None, adapter_name="a", use_safetensors=True)
    assert max_diff(run(fresh, **kwargs), expected) <= 1e-6
    assert fresh.peft_config["a"].r == 4 and fresh.peft_config["a"].lora_alpha == 4


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")
def test_set_adapters_switches_and_weights_adapters(model):
    kwargs = inputs(model)
    base_out = run(model, **kwargs)
    model.add_adapter(lora_config(init_lora_weights=False), adapter_name="a")
    out_a = run(model, **kwargs)
    torch.manual_seed(11)
    model.add_adapter(lora_config(init_lora_weights=False), adapter_name="b")
    model.set_adapters("b")
    out_b = run(model, **kwargs)
    assert max_diff(out_a, base_out) > 1e-4 and max_diff(out_b, out_a) > 1e-4

    model.set_adapters("a")
    assert max_diff(run(model, **kwargs), out_a) <= 1e-6
    model.set_adapters(["a", "b"], weights=[1.0, 0.0])
    assert max_diff(run(model, **kwargs), out_a) <= 1e-6
    model.set_adapters(["a", "b"], weights=[1.0, 1.0])
    both = run(model, **kwargs)
    assert max_diff(both, out_a) > 1e-4 and max_diff(both, out_b) > 1e-4
    model.set_adapters("a", weights=0.0)
    assert max_diff(run(model, **kwargs), base_out) <= LORA_OFF_TOLERANCE


def test_lora_scale_zero_gives_the_base_output_and_is_not_sticky(model):
    kwargs = inputs(model)
    base_out = run(model, **kwargs)
    model.add_adapter(lora_config(init_lora_weights=False), adapter_name="a")
    lora_out = run(model, **kwargs)
    assert max_diff(lora_out, base_out) > 1e-4
    assert max_diff(run(model, **kwargs, joint_attention_kwargs={"scale": 0.0}), base_out) <= LORA_OFF_TOLERANCE
    assert max_diff(run(model, **kwargs), lora_out) <= 1e-6


def test_lora_scale_is_undone_when_a_block_raises(model):
    """A LoRA-scaled call that fails inside a block (here the attention backend refuses the needed mask) leaves
    the LoRA layers as they were: the next call's output equals a fresh model's."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    from mmdit_diffusers.errors import InputError

    model.add_adapter(lora_config(init_lora_weights=False), adapter_name="a")
    kwargs = inputs(model)
    lora_out = run(model, **kwargs)
    half_out = run(model, **kwargs, joint_attention_kwargs={"scale": 0.5})
    assert max_diff(half_out, lora_out) > 1e-4
    model.set_attention_backend("_native_flash")  # PyTorch's flash kernel takes no mask (it runs on CPUs too)
    try:
        with pytest.raises(InputError, match="takes no attention mask"):
            run(model, **kwargs, joint_attention_kwargs={"scale": 0.5},
                encoder_attention_mask=padding_mask([3, TXT_LEN], TXT_LEN))
    finally:
        model.set_attention_backend("native")
        _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)
    assert max_diff(run(model, **kwargs), lora_out) <= 1e-6
    assert max_diff(run(model, **kwargs, joint_attention_kwargs={"scale": 0.5}), half_out) <= 1e-6
