"""diffusers' cache hooks used from `MMDiTPipeline`: the pipeline calls the transformer inside a cache context and
exposes `current_timestep` (as diffusers' FLUX pipeline does), so the hooks that need them run, skip work, and start
afresh at every call. (What each hook computes is tested on the transformer in tests/test_cache_hooks.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.hooks import FirstBlockCacheConfig, PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig

from tiny_pipeline import tiny_mmdit_pipeline

STEPS = 6


@pytest.fixture
def pipe():
    pipe = tiny_mmdit_pipeline(seed=0, layout="sd3", masked=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe, **kwargs) -> np.ndarray:
    return pipe(["a red circle", "two blue squares"], num_inference_steps=STEPS, guidance_scale=4.0,
                generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images


def _count_attention_rows(pipe) -> list[int]:
    """Batch rows through the joint attentions' `to_q` (they run only when the attention is computed)."""
    rows = [0]
    for name, module in pipe.transformer.named_modules():
        if name.endswith(".attn.to_q"):
            module.register_forward_pre_hook(lambda module, args: rows.__setitem__(0, rows[0] + args[0].shape[0]))
    return rows


def test_first_block_cache_from_the_pipeline(pipe):
    rows = _count_attention_rows(pipe)
    plain = _images(pipe)
    full = rows[0]
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.0))  # never reuse: the same numbers
    np.testing.assert_allclose(_images(pipe), plain, atol=1e-6)
    pipe.transformer.disable_cache()
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=1e9))  # always reuse after the first step
    rows[0] = 0
    cached = _images(pipe)
    assert rows[0] < full and np.abs(cached - plain).max() > 1e-4
    # the cache starts afresh at every call
    np.testing.assert_allclose(_images(pipe), cached, atol=1e-6)


def test_timestep_driven_caches_read_current_timestep(pipe):
    rows = _count_attention_rows(pipe)
    _images(pipe)
    full = rows[0]
    seen = []
    pipe.transformer.enable_cache(PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(0, 1000),
        spatial_attention_block_identifiers=("transformer_blocks",),
        current_timestep_callback=lambda: seen.append(pipe.current_timestep) or pipe.current_timestep,
    ))
    rows[0] = 0
    _images(pipe)
    assert rows[0] < full
    assert sorted({float(t) for t in seen}, reverse=True) == [float(t) for t in pipe.scheduler.timesteps]
    assert pipe.current_timestep is None  # outside sampling


def test_taylorseer_with_skip_layer_guidance(pipe):
    """Skip-layer guidance's extra call runs in a cache context of its own."""
    pipe.transformer.enable_cache(TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1,
                                                        taylor_factors_dtype=torch.float32))
    images = _images(pipe, skip_guidance_layers=[0], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0)
    assert np.isfinite(images).all()
