"""diffusers' cache and skip hooks on `MMDiTTransformer2DModel` (`enable_cache`, `apply_*`), regional compilation and
layerwise casting: each hook changes the computation where it should, checked against `SD3Transformer2DModel` with
the same hook on the same weights where SD3 runs it, and by counting the blocks that run where it does not."""

from __future__ import annotations

import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    LayerSkipConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
    apply_first_block_cache,
    apply_layer_skip,
)
from diffusers.models.attention_processor import JointAttnProcessor2_0

from mmdit_diffusers import MMDiTTransformer2DModel
from mmdit_diffusers.conversion.sd3 import sd3_module_name_to_mmdit
from mmdit_diffusers.models.attention import MMDiTAttnProcessor

SD3_TINY = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=4,
                joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=20, out_channels=4,
                pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0,))
TOLERANCE = 1e-5


def make_pair(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    sd3 = SD3Transformer2DModel(**{**SD3_TINY, **overrides})
    with torch.no_grad():
        for param in sd3.parameters():
            param.normal_(0, 0.1)
    return sd3.eval(), MMDiTTransformer2DModel.from_sd3(sd3).eval()


def make_inputs(batch: int = 2, seed: int = 1, timestep: float | None = None) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(batch, 9, 24, generator=g),
        pooled_projections=torch.randn(batch, 20, generator=g),
        timestep=torch.rand(batch, generator=g) * 1000 if timestep is None else torch.full((batch,), timestep),
    )


def run(model, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**kwargs).sample


def assert_close(actual, expected, tolerance=TOLERANCE):
    assert expected.abs().max() > 0.1
    assert (actual - expected).abs().max().item() <= tolerance


def steps(model, timesteps=(900.0, 800.0, 700.0, 600.0)) -> list[torch.Tensor]:
    """A denoising-like sequence of calls: same prompt, drifting latents, decreasing timesteps."""
    base = make_inputs(seed=1)
    outs = []
    for i, t in enumerate(timesteps):
        kwargs = dict(base, hidden_states=base["hidden_states"] + 0.05 * i, timestep=torch.full((2,), t))
        outs.append(run(model, **kwargs))
    return outs


class Counter:
    """Counts calls of an attention processor (one per block that runs)."""

    def __init__(self, model):
        self.calls = 0
        counter = self

        class Counting(MMDiTAttnProcessor):
            def __call__(self, *args, **kwargs):
                counter.calls += 1
                return super().__call__(*args, **kwargs)

        for block in model.transformer_blocks[1:]:
            block.attn.set_processor(Counting())


# ----------------------------------------------------------------------------------------------------------
# enable_cache / disable_cache with each config
# ----------------------------------------------------------------------------------------------------------
def timestep_callback(holder):
    return lambda: holder["t"]


def in_cache_context(model, **kwargs) -> torch.Tensor:
    """One denoiser call inside a cache context, as diffusers' pipelines make it (`CacheMixin.cache_context`; SD3
    has no CacheMixin, so its context is set the way that method sets it)."""
    if isinstance(model, MMDiTTransformer2DModel):
        with model.cache_context("cond"):
            return run(model, **kwargs)
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    _set_cache_context(model, CacheContext("cond"))
    try:
        return run(model, **kwargs)
    finally:
        _set_cache_context(model, None)


@pytest.mark.parametrize("name", ["pab", "faster", "taylorseer"])
def test_cache_configs_compute_what_they_compute_on_sd3(name):
    """Same hook, same weights, same calls: ours equals SD3 at every step, and differs from running uncached."""
    sd3, ours = make_pair()
    uncached = steps(ours)
    results = []
    for model in (sd3, ours):
        holder = {"t": 1000}
        if name == "pab":
            config = PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                                     spatial_attention_timestep_skip_range=(0, 1000),
                                                     current_timestep_callback=timestep_callback(holder))
        elif name == "faster":
            config = FasterCacheConfig(spatial_attention_block_skip_range=2,
                                       spatial_attention_timestep_skip_range=(0, 1000),
                                       unconditional_batch_skip_range=2,
                                       unconditional_batch_timestep_skip_range=(0, 1000),
                                       current_timestep_callback=timestep_callback(holder),
                                       attention_weight_callback=lambda _: 0.4, tensor_format="BCHW",
                                       _unconditional_conditional_input_kwargs_identifiers=[
                                           "hidden_states", "encoder_hidden_states", "timestep",
                                           "pooled_projections"])
        else:
            config = TaylorSeerCacheConfig(cache_interval=3, disable_cache_before_step=1, max_order=1)
        if model is ours:
            ours.enable_cache(config)
            assert ours.is_cache_enabled
        else:
            from diffusers.hooks import apply_faster_cache, apply_pyramid_attention_broadcast, apply_taylorseer_cache

            {"pab": apply_pyramid_attention_broadcast, "faster": apply_faster_cache,
             "taylorseer": apply_taylorseer_cache}[name](sd3, config)
        outs = []
        for i, t in enumerate((900.0, 800.0, 700.0, 600.0)):
            holder["t"] = t
            base = make_inputs(seed=1)
            kwargs = dict(base, hidden_states=base["hidden_states"] + 0.05 * i, timestep=torch.full((2,), t))
            outs.append(in_cache_context(model, **kwargs))
        results.append(outs)
    for sd3_out, ours_out in zip(*results):
        assert_close(ours_out, sd3_out)
    assert max((a - b).abs().max().item() for a, b in zip(results[1], uncached)) > 1e-3  # the hook acted
    ours.disable_cache()
    assert not ours.is_cache_enabled
    assert all(torch.equal(a, b) for a, b in zip(steps(ours), uncached))


def test_first_block_cache_skips_the_other_blocks_when_the_first_barely_changes():
    """With a threshold no change reaches, the second call runs the first block only and reuses the other blocks'
    cached residuals; with threshold 0 every block runs. (SD3 cannot run it: its last block returns no text, of
    which the hook takes a residual.)"""
    sd3, ours = make_pair()
    apply_first_block_cache(sd3, FirstBlockCacheConfig(threshold=0.0))
    with pytest.raises(TypeError):
        in_cache_context(sd3, **make_inputs())
    kwargs = make_inputs()
    near = dict(kwargs, hidden_states=kwargs["hidden_states"] + 1e-3)
    expected_first, expected_near = run(ours, **kwargs), run(ours, **near)
    counter = Counter(ours)

    ours.enable_cache(FirstBlockCacheConfig(threshold=0.0))  # always recompute
    assert torch.equal(in_cache_context(ours, **kwargs), expected_first)
    assert torch.equal(in_cache_context(ours, **near), expected_near)
    assert counter.calls == 2 * 2  # blocks 1 and 2, both calls
    ours.disable_cache()

    counter.calls = 0
    ours.enable_cache(FirstBlockCacheConfig(threshold=1e9))  # never recompute after the first call
    assert torch.equal(in_cache_context(ours, **kwargs), expected_first)
    cached = in_cache_context(ours, **near)
    assert counter.calls == 2  # the second call ran block 0 only
    assert 0 < (cached - expected_near).abs().max() < 0.05  # an approximation of the full result
    ours.disable_cache()
    assert torch.equal(run(ours, **near), expected_near)


# ----------------------------------------------------------------------------------------------------------
# LayerSkip
# ----------------------------------------------------------------------------------------------------------
def test_layer_skip_of_whole_blocks_equals_sd3s_skip_layers():
    """On SD3 diffusers' block skip returns (hidden, encoder) in the wrong order for JointTransformerBlock; ours
    is registered with the order our block returns, so it equals SD3's own `skip_layers`."""
    sd3, ours = make_pair()
    kwargs = make_inputs()
    expected = run(sd3, **kwargs, skip_layers=[1])
    apply_layer_skip(ours, LayerSkipConfig(indices=[1], fqn="transformer_blocks"))
    assert_close(run(ours, **kwargs), expected)
    assert (expected - run(sd3, **kwargs)).abs().max() > 1e-3


def test_layer_skip_of_mlps_as_on_sd3():
    sd3, ours = make_pair()
    kwargs = make_inputs()
    unskipped = run(sd3, **kwargs)
    for model in (sd3, ours):
        apply_layer_skip(model, LayerSkipConfig(indices=[0], fqn="transformer_blocks", skip_attention=False))
    expected = run(sd3, **kwargs)
    assert (expected - unskipped).abs().max() > 1e-3
    assert_close(run(ours, **kwargs), expected)


def test_layer_skip_of_attention_scores_uses_the_values_as_attention_output():
    """Not registered for SD3's processor; what the hook does (each attention's softmax(q k^T) v becomes v, through
    diffusers' `AttentionScoreSkipFunctionMode`) is applied to SD3's block 0 by hand."""
    from diffusers.hooks.layer_skip import AttentionScoreSkipFunctionMode

    sd3, ours = make_pair()

    class ScoresSkipped(JointAttnProcessor2_0):
        def __call__(self, *args, **kwargs):
            with AttentionScoreSkipFunctionMode():
                return super().__call__(*args, **kwargs)

    sd3.transformer_blocks[0].attn.set_processor(ScoresSkipped())
    sd3.transformer_blocks[0].attn2.set_processor(ScoresSkipped())
    kwargs = make_inputs()
    apply_layer_skip(ours, LayerSkipConfig(indices=[0], fqn="transformer_blocks", skip_attention=False,
                                           skip_ff=False, skip_attention_scores=True))
    assert_close(run(ours, **kwargs), run(sd3, **kwargs))
    assert (run(ours, **kwargs) - run(make_pair()[1], **kwargs)).abs().max() > 1e-3  # the hook acted


def test_layer_skip_of_attention_alone_replaces_each_attention_by_its_input():
    """Not registered for SD3's processor; ours: as if block 0's attentions returned their inputs."""
    sd3, ours = make_pair()

    class Identity(JointAttnProcessor2_0):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
            return hidden_states if encoder_hidden_states is None else (hidden_states, encoder_hidden_states)

    sd3.transformer_blocks[0].attn.set_processor(Identity())
    sd3.transformer_blocks[0].attn2.set_processor(Identity())
    kwargs = make_inputs()
    apply_layer_skip(ours, LayerSkipConfig(indices=[0], fqn="transformer_blocks", skip_attention=True, skip_ff=False))
    assert_close(run(ours, **kwargs), run(sd3, **kwargs))


# ----------------------------------------------------------------------------------------------------------
# Regional compilation and layerwise casting
# ----------------------------------------------------------------------------------------------------------
def test_compile_repeated_blocks_compiles_each_block():
    _, ours = make_pair()
    kwargs = make_inputs()
    expected = run(ours, **kwargs)
    ours.compile_repeated_blocks(backend="eager", fullgraph=True)
    assert all(block._compiled_call_impl is not None for block in ours.transformer_blocks)
    assert_close(run(ours, **kwargs), expected)


def test_float8_layerwise_casting_is_no_worse_than_sd3s():
    sd3, ours = make_pair()
    kwargs = make_inputs()
    exact_sd3, exact_ours = run(sd3, **kwargs), run(ours, **kwargs)
    errors = {}
    for name, model, exact in (("sd3", sd3, exact_sd3), ("ours", ours, exact_ours)):
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
        errors[name] = (run(model, **kwargs) - exact).abs().max().item()
    assert errors["ours"] > 0  # the casting acted
    # the same layers are stored in float8 (SD3's names converted to ours) ...
    cast = {n for n, p in ours.named_parameters() if p.dtype == torch.float8_e4m3fn}
    sd3_cast = {n for n, p in sd3.named_parameters() if p.dtype == torch.float8_e4m3fn}
    assert cast == {sd3_module_name_to_mmdit(n) for n in sd3_cast}
    # ... so the errors differ only by float32 rounding in the unquantized arithmetic
    assert errors["ours"] <= errors["sd3"] * 1.01, errors
    kept = {n for n, p in ours.named_parameters() if p.dtype == torch.float32}
    assert "x_embedder.weight" in kept and "transformer_blocks.0.img.modulation.linear.weight" in kept
    assert "transformer_blocks.0.attn.to_q.weight" in cast and "transformer_blocks.0.img.mlp.fc1.weight" in cast
