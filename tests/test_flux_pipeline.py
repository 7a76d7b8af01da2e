"""MMDiTPipeline on a diffusers-format FLUX.1 folder: an `MMDiTFluxPipeline` whose `FluxTransformer2DModel` is
converted on load, giving diffusers' `FluxPipeline`'s images.

The folders are tiny random FLUX.1 pipelines built with diffusers' and transformers' own classes (tests/tiny_flux.py:
CLIPTextModel, T5EncoderModel, AutoencoderKL with FLUX.1's shift / scale, FluxTransformer2DModel with and without the
guidance embedding, FLUX.1 [dev]'s dynamic-shift scheduler, local tokenizers) and saved with `save_pretrained`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from diffusers.hooks import FirstBlockCacheConfig, PyramidAttentionBroadcastConfig
from PIL import Image

from mmdit_diffusers import InputError, MMDiTFluxPipeline, MMDiTPipeline, MMDiTTransformer2DModel
from mmdit_diffusers.models.embeddings import patchify, unpatchify
from tiny_flux import save_tiny_flux_pipeline, tiny_flux_transformer
from tiny_pipeline import save_tiny_sd3_pipeline

PROMPTS = ["a red circle", "two blue squares left of a green triangle"]
T5_TOKENS = 16


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _public(config) -> dict:
    """A config as JSON would hold it (tuples as lists), without diffusers' bookkeeping (`_name_or_path`, ...)."""
    return json.loads(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}))


def _call(pipe, seed: int = 0, **kwargs):
    args = dict(prompt=PROMPTS, num_inference_steps=3, guidance_scale=4.0, max_sequence_length=T5_TOKENS,
                height=16, width=16, output_type="np", generator=torch.Generator().manual_seed(seed))
    args.update(kwargs)
    return pipe(**args).images


@pytest.fixture(scope="module")
def flux_dirs(tmp_path_factory):
    """{guidance_embeds: a saved diffusers FLUX.1 folder}: [dev]-like (guidance embedding) and [schnell]-like."""
    return {ge: save_tiny_flux_pipeline(tmp_path_factory.mktemp(f"tiny-flux-{ge}"), guidance_embeds=ge)
            for ge in (True, False)}


@pytest.fixture(scope="module")
def pipelines(flux_dirs):
    """{guidance_embeds: (diffusers' FluxPipeline, ours)}, both from the same folder."""
    return {ge: (_quiet(FluxPipeline.from_pretrained(path)), _quiet(MMDiTPipeline.from_pretrained(path)))
            for ge, path in flux_dirs.items()}


CASES = {
    "square": dict(),
    "wide-true-cfg": dict(width=32, negative_prompt=["a cat", "a dog"], true_cfg_scale=4.0),
    "tall-per-prompt": dict(height=32, num_images_per_prompt=2),
    "true-cfg-per-prompt-prompt-2": dict(height=32, width=32, num_images_per_prompt=2, negative_prompt=["a cat"] * 2,
                                         true_cfg_scale=2.5, prompt_2=["a photo", "a yellow dog"]),
    # with `sigmas`, an explicit `num_inference_steps` must be their length (SD3's check; FluxPipeline ignores it)
    "sigmas-one-generator-per-image": dict(sigmas=[1.0, 0.7, 0.4, 0.2], num_inference_steps=4, generator_per_image=True),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("guidance_embeds", [True, False], ids=["guidance-embeds", "no-guidance-embeds"])
def test_same_images_as_flux_pipeline(pipelines, guidance_embeds, case):
    reference, ours = pipelines[guidance_embeds]
    kwargs = dict(CASES[case])
    images = len(PROMPTS) * kwargs.get("num_images_per_prompt", 1)

    def call(pipe):
        if kwargs.get("generator_per_image"):
            generator = [torch.Generator().manual_seed(i) for i in range(images)]
            return _call(pipe, generator=generator, **{k: v for k, v in kwargs.items() if k != "generator_per_image"})
        return _call(pipe, **kwargs)

    expected, got = call(reference), call(ours)
    assert got.shape == expected.shape == (images, kwargs.get("height", 16), kwargs.get("width", 16), 3)
    assert np.abs(got - expected).max() <= 1e-4
    # the random FLUX weights are not trivial: the two prompts give different images
    assert np.abs(expected[0] - expected[-1]).max() > 1e-2


def test_a_flux_folder_opens_as_flux_pipeline_with_the_transformer_converted(pipelines, flux_dirs):
    for guidance_embeds, (reference, ours) in pipelines.items():
        assert type(ours) is MMDiTFluxPipeline
        assert isinstance(ours.transformer, MMDiTTransformer2DModel)
        assert ours.transformer.config.guidance_embeds == guidance_embeds
        assert not ours.transformer.config.use_text_attention_mask  # FLUX.1 attends to T5's padding
        assert ours.default_sample_size == reference.default_sample_size
        assert ours.vae_scale_factor == reference.vae_scale_factor
    # the class itself opens FLUX folders, and refuses other kinds, naming the right loader
    assert type(_quiet(MMDiTFluxPipeline.from_pretrained(flux_dirs[True]))) is MMDiTFluxPipeline


def test_an_sd3_folder_is_not_a_flux_pipeline(tmp_path):
    sd3_dir = save_tiny_sd3_pipeline(tmp_path / "sd3")
    with pytest.raises(InputError, match="not a FLUX.1 pipeline.*MMDiTPipeline.from_pretrained"):
        MMDiTFluxPipeline.from_pretrained(sd3_dir)


def test_saving_writes_our_layout_which_loads_back_unchanged(flux_dirs, tmp_path):
    pipe = _quiet(MMDiTPipeline.from_pretrained(flux_dirs[True]))
    pipe.register_sampler_defaults(num_inference_steps=2, guidance_scale=2.0, true_cfg_scale=3.0)
    pipe.save_pretrained(tmp_path / "ours")
    index = json.loads((tmp_path / "ours" / "model_index.json").read_text())
    assert index["_class_name"] == "MMDiTFluxPipeline"
    assert index["transformer"] == ["mmdit_diffusers", "MMDiTTransformer2DModel"]
    assert "image_encoder" not in index and index["sampler_defaults"]["true_cfg_scale"] == 3.0
    assert (tmp_path / "ours" / "pipeline.py").read_text().count("MMDiTFluxPipeline") >= 2

    expected = _call(pipe, num_inference_steps=2, guidance_scale=2.0, true_cfg_scale=3.0, negative_prompt="a cat")
    state = pipe.transformer.state_dict()
    for loader in (MMDiTPipeline, MMDiTFluxPipeline):
        loaded = _quiet(loader.from_pretrained(tmp_path / "ours"))
        assert type(loaded) is MMDiTFluxPipeline
        assert _public(loaded.transformer.config) == _public(pipe.transformer.config)
        assert all(torch.equal(state[k], v) for k, v in loaded.transformer.state_dict().items())
        # the stored sampler settings are used when the caller leaves them out
        got = _call(loaded, num_inference_steps=None, guidance_scale=None, negative_prompt="a cat")
        np.testing.assert_array_equal(got, expected)
        without_cfg = _call(loaded, num_inference_steps=2, guidance_scale=2.0, negative_prompt="a cat", true_cfg_scale=1)
        assert np.abs(got - without_cfg).max() > 1e-3


def test_prompt_embeddings_are_flux_pipeline_s(pipelines):
    reference, ours = pipelines[True]
    embeds, pooled, text_ids = ours.encode_prompt(PROMPTS, num_images_per_prompt=2, max_sequence_length=T5_TOKENS)
    ref_embeds, ref_pooled, ref_ids = reference.encode_prompt(PROMPTS, num_images_per_prompt=2,
                                                             max_sequence_length=T5_TOKENS)
    torch.testing.assert_close(embeds, ref_embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, ref_pooled, rtol=0, atol=1e-6)
    torch.testing.assert_close(text_ids, ref_ids)
    # precomputed embeddings (and their negatives) give the images of the prompts
    negative, negative_pooled, _ = ours.encode_prompt(["a cat"] * 2, max_sequence_length=T5_TOKENS)
    embeds, pooled, _ = ours.encode_prompt(PROMPTS, max_sequence_length=T5_TOKENS)
    from_embeds = _call(ours, prompt=None, prompt_embeds=embeds, pooled_prompt_embeds=pooled, true_cfg_scale=3.0,
                        negative_prompt_embeds=negative, negative_pooled_prompt_embeds=negative_pooled)
    np.testing.assert_allclose(from_embeds, _call(ours, negative_prompt="a cat", true_cfg_scale=3.0), atol=1e-6)


def test_callbacks_see_unpacked_latents_that_match_flux_pipeline_s(pipelines):
    reference, ours = pipelines[True]
    seen = {"reference": [], "ours": []}

    def recorder(name):
        def callback(pipe, step, timestep, kwargs):
            seen[name].append((step, kwargs["latents"].clone(), kwargs["prompt_embeds"].shape))
            return {"latents": kwargs["latents"] * 0.9} if step == 0 else {}  # a change that steers the rest
        return callback

    inputs = ["latents", "prompt_embeds"]
    expected = _call(reference, callback_on_step_end=recorder("reference"), callback_on_step_end_tensor_inputs=inputs)
    got = _call(ours, callback_on_step_end=recorder("ours"), callback_on_step_end_tensor_inputs=inputs)
    assert np.abs(got - expected).max() <= 1e-4
    assert [s for s, _, _ in seen["ours"]] == [0, 1, 2]
    for (_, packed, ref_shape), (_, latents, shape) in zip(seen["reference"], seen["ours"]):
        assert latents.shape == (2, 4, 8, 8) and shape == ref_shape == (2, T5_TOKENS, 64)
        torch.testing.assert_close(patchify(latents, 2), packed, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        _call(ours, callback_on_step_end=recorder("ours"), callback_on_step_end_tensor_inputs=["pooled_prompt_embeds"])


def test_output_types(pipelines):
    reference, ours = pipelines[True]
    as_np = _call(ours, width=32)
    as_pt = _call(ours, width=32, output_type="pt")
    as_pil = _call(ours, width=32, output_type="pil")
    latents = _call(ours, width=32, output_type="latent")
    assert as_pt.shape == (2, 3, 16, 32) and np.abs(as_pt.permute(0, 2, 3, 1).numpy() - as_np).max() <= 1e-6
    assert all(isinstance(im, Image.Image) and im.size == (32, 16) for im in as_pil)
    assert np.abs(np.asarray(as_pil[1], dtype=np.float32) / 255 - as_np[1]).max() <= 1 / 255 + 1e-6
    # "latent": [B, C, h, w], FluxPipeline's packed latents unpacked
    assert latents.shape == (2, 4, 8, 16)
    packed = _call(reference, width=32, output_type="latent")
    torch.testing.assert_close(patchify(latents, 2), packed, rtol=0, atol=1e-5)
    np.testing.assert_allclose(ours.decode_latents(latents, "np"), as_np, atol=1e-6)


def test_packed_or_unpacked_initial_latents(pipelines):
    reference, ours = pipelines[False]
    # 2 prompts x 2 images; 16 x 16 px -> 8 x 8 latents -> 4 x 4 tokens of 4 channels x 2 x 2
    packed = torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(3))
    expected = _call(reference, latents=packed, num_images_per_prompt=2)
    np.testing.assert_allclose(_call(ours, latents=packed, num_images_per_prompt=2), expected, atol=1e-4)
    np.testing.assert_allclose(_call(ours, latents=unpatchify(packed, 2, 8, 8), num_images_per_prompt=2), expected,
                               atol=1e-4)
    expected_shapes = r"`latents` has shape \(4, 16, 16\); expected \[2, 4, 8, 8\], or FLUX's packed \[2, 16, 16\]"
    with pytest.raises(InputError, match=expected_shapes):
        _call(ours, latents=packed)


def test_max_sequence_length_is_checked_against_the_transformer(pipelines):
    _, ours = pipelines[True]
    capacity = ours.transformer.config.txt_tokens
    with pytest.raises(InputError, match=f"`max_sequence_length`={capacity + 1} is too long.*txt_tokens={capacity}"):
        _call(ours, max_sequence_length=capacity + 1)
    with pytest.raises(InputError, match="`max_sequence_length` must be a positive integer"):
        _call(ours, max_sequence_length=0)


def test_a_text_masked_flux_style_model_does_not_see_the_padding(pipelines):
    """With `use_text_attention_mask`, T5 runs masked and the transformer drops the padding: the image does not
    depend on how far the prompts are padded (`max_sequence_length`)."""
    _, converted = pipelines[True]
    config = {**converted.transformer.config, "use_text_attention_mask": True}
    transformer = MMDiTTransformer2DModel.from_config(config)
    transformer.load_state_dict(MMDiTTransformer2DModel.from_flux(tiny_flux_transformer(1)).state_dict())
    components = {**converted.components, "transformer": transformer.eval()}
    masked = _quiet(MMDiTFluxPipeline(**components))
    short, long = _call(masked, max_sequence_length=10), _call(masked, max_sequence_length=T5_TOKENS)
    assert np.abs(short - long).max() <= 1e-5
    assert np.abs(short[0] - short[1]).max() > 1e-2


# ----------------------------------------------------------------------------------------------------------
# diffusers' cache hooks, from the pipeline (the transformer runs in the cache context "cond", as FluxPipeline's)
# ----------------------------------------------------------------------------------------------------------
def _count_attention_rows(pipe) -> tuple[list[int], list]:
    """Batch rows through the attentions' `to_q` (they run only when the attention is computed), and the hooks."""
    rows = [0]
    handles = [module.register_forward_pre_hook(lambda module, args: rows.__setitem__(0, rows[0] + args[0].shape[0]))
               for name, module in pipe.transformer.named_modules() if name.endswith(".attn.to_q")]
    return rows, handles


def test_first_block_cache_from_the_flux_pipeline_gives_flux_pipeline_s_images(pipelines):
    reference, ours = pipelines[True]
    plain, plain_cfg = _call(ours), _call(ours, negative_prompt="a cat", true_cfg_scale=3.0)
    rows, handles = _count_attention_rows(ours)
    try:
        ours.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.0))  # never reuse: the uncached images
        np.testing.assert_allclose(_call(ours), plain, atol=1e-6)
        np.testing.assert_allclose(_call(ours, negative_prompt="a cat", true_cfg_scale=3.0), plain_cfg, atol=1e-6)
        full = rows[0]
        ours.transformer.disable_cache()
        for pipe in (reference, ours):  # always reuse after the first step: the same skipped work on both
            pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=1e9))
        rows[0] = 0
        cached = _call(ours)
        assert rows[0] < full / 2 and np.abs(cached - plain).max() > 1e-4
        assert np.abs(cached - _call(reference)).max() <= 1e-4
        np.testing.assert_allclose(_call(ours), cached, atol=1e-6)  # the cache starts afresh at every call
    finally:
        for handle in handles:
            handle.remove()
        for pipe in (reference, ours):
            if pipe.transformer.is_cache_enabled:
                pipe.transformer.disable_cache()


def test_pyramid_attention_broadcast_from_the_flux_pipeline_reads_current_timestep(pipelines):
    _, ours = pipelines[False]
    plain = _call(ours)
    rows, handles = _count_attention_rows(ours)
    _call(ours)
    full, seen = rows[0], []
    try:
        ours.transformer.enable_cache(PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(0, 1000),
            spatial_attention_block_identifiers=("transformer_blocks", "single_transformer_blocks"),
            current_timestep_callback=lambda: seen.append(ours.current_timestep) or ours.current_timestep,
        ))
        rows[0] = 0
        images = _call(ours)
    finally:
        for handle in handles:
            handle.remove()
        ours.transformer.disable_cache()
    assert rows[0] < full and np.isfinite(images).all() and np.abs(images - plain).max() > 1e-6
    assert sorted({float(t) for t in seen}, reverse=True) == [float(t) for t in ours.scheduler.timesteps]
    assert ours.current_timestep is None  # outside sampling


# ----------------------------------------------------------------------------------------------------------
# Bad input: SD3's call checks (`check_inputs`, `call_checks`), before any model runs
# ----------------------------------------------------------------------------------------------------------
BAD_CALLS = {
    "generator-a-device-name": (dict(generator="cuda"), r"`generator` must be a torch.Generator.*got 'cuda'"),
    "sigmas-of-the-wrong-length": (dict(sigmas=[1.0, 0.5]), r"`sigmas` has 2 values but `num_inference_steps`=3"),
    "negative-true-cfg-scale": (dict(true_cfg_scale=-1.0), r"`true_cfg_scale`=-1.0 must be a finite number >= 0"),
    "height-not-a-multiple": (dict(height=17), r"`height`=17 px must be a positive multiple of vae_scale_factor \* patch_size"),
    "prompt-embeds-of-another-width": (
        dict(prompt=None, prompt_embeds=torch.zeros(2, T5_TOKENS, 7), pooled_prompt_embeds=torch.zeros(2, 32)),
        r"`prompt_embeds` has shape \(2, 16, 7\); this transformer reads \[B, L <= \d+, txt_dim=64\]"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_calls_are_input_errors_that_name_the_argument(pipelines, case):
    _, ours = pipelines[True]
    kwargs, message = BAD_CALLS[case]
    calls = []
    handle = ours.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with pytest.raises(InputError, match=message):
            _call(ours, **kwargs)
    finally:
        handle.remove()
    assert not calls  # refused before any model runs


def test_the_memory_check_refuses_a_call_too_large_for_the_machine(pipelines):
    _, ours = pipelines[True]
    with pytest.raises(InputError, match=r"needs at least .* GiB of memory.*the sampler's steps"):
        _call(ours, num_inference_steps=10**12)
