"""MMDiTPipeline end to end on tiny random components (offline, CPU, 16 x 16 px, 2 steps)."""

from __future__ import annotations

import collections
import copy
import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift
from peft import LoraConfig, get_peft_model_state_dict
from safetensors import safe_open

from mmdit_diffusers.pipelines import MMDiTPipeline, MMDiTPipelineOutput
from tiny_pipeline import LATENT_CHANNELS, T5_TOKENS, tiny_mmdit_pipeline

PROMPTS = ["a red circle", "two blue squares left of a green triangle"]
STEPS = 2


def generate(pipe, prompt=PROMPTS[0], seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("output_type", "np")
    kwargs.setdefault("guidance_scale", 3.0)
    if "generator" not in kwargs:
        kwargs["generator"] = torch.Generator().manual_seed(seed)
    if "prompt_embeds" not in kwargs:
        kwargs["prompt"] = prompt
    return pipe(**kwargs).images


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return _quiet(tiny_mmdit_pipeline(seed=0, layout="sd3", masked=True))


@pytest.fixture(scope="module")
def unmasked_pipe():
    return _quiet(tiny_mmdit_pipeline(seed=0, layout="sd3", masked=False))


@pytest.fixture(scope="module")
def saved_dir(pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("mmdit-pipeline")
    pipe.save_pretrained(path)
    return str(path)


# ---------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------
def test_every_output_type(pipe):
    as_np = generate(pipe, output_type="np")
    as_pt = generate(pipe, output_type="pt")
    as_pil = generate(pipe, output_type="pil")
    latents = generate(pipe, output_type="latent")

    assert isinstance(as_np, np.ndarray) and as_np.shape == (1, 16, 16, 3)
    assert 0.0 <= as_np.min() and as_np.max() <= 1.0
    assert isinstance(as_pt, torch.Tensor) and as_pt.shape == (1, 3, 16, 16)
    np.testing.assert_allclose(as_pt.permute(0, 2, 3, 1).numpy(), as_np, atol=1e-6)
    assert isinstance(as_pil, list) and isinstance(as_pil[0], PIL.Image.Image) and as_pil[0].size == (16, 16)
    np.testing.assert_array_equal(np.asarray(as_pil[0]), (as_np[0] * 255).round().astype(np.uint8))
    assert isinstance(latents, torch.Tensor) and latents.shape == (1, LATENT_CHANNELS, 8, 8)


def test_return_dict_and_tuple(pipe):
    output = pipe(PROMPTS[0], num_inference_steps=STEPS, output_type="np", generator=torch.Generator().manual_seed(0))
    assert isinstance(output, MMDiTPipelineOutput)
    (images,) = pipe(PROMPTS[0], num_inference_steps=STEPS, output_type="np", return_dict=False,
                     generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(images, output.images)


def test_default_size_is_sample_size_times_vae_scale(pipe):
    assert pipe.default_sample_size * pipe.vae_scale_factor == 16
    assert generate(pipe, height=32, width=16).shape == (1, 32, 16, 3)


def test_same_seed_is_bit_identical_and_seed_matters(pipe):
    first, second = generate(pipe, seed=7), generate(pipe, seed=7)
    np.testing.assert_array_equal(first, second)
    assert np.abs(generate(pipe, seed=8) - first).max() > 1e-3


def test_a_stochastic_scheduler_draws_its_noise_from_the_generator(pipe):
    deterministic = generate(pipe, seed=7)
    scheduler = pipe.scheduler
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config, stochastic_sampling=True)
    try:
        torch.manual_seed(0)
        first = generate(pipe, seed=7)
        torch.manual_seed(1)  # the global RNG plays no part
        np.testing.assert_array_equal(generate(pipe, seed=7), first)
        assert np.abs(generate(pipe, seed=8) - first).max() > 1e-3
        assert np.abs(deterministic - first).max() > 1e-3  # the step noise does change the image
    finally:
        pipe.scheduler = scheduler


def test_image_depends_on_prompt(pipe):
    assert np.abs(generate(pipe, PROMPTS[0]) - generate(pipe, PROMPTS[1])).max() > 1e-3


@pytest.mark.parametrize("masked", [True, False])
def test_batch_image_equals_the_prompt_alone(pipe, unmasked_pipe, masked):
    pipe = pipe if masked else unmasked_pipe
    generators = [torch.Generator().manual_seed(11), torch.Generator().manual_seed(12)]
    batch = generate(pipe, PROMPTS, generator=generators)
    alone = generate(pipe, PROMPTS[1], generator=torch.Generator().manual_seed(12))
    assert np.abs(batch[1] - alone[0]).max() <= 1e-4
    assert np.abs(batch[0] - batch[1]).max() > 1e-3


def test_num_images_per_prompt_shapes(pipe):
    images = generate(pipe, PROMPTS, num_images_per_prompt=3)
    assert images.shape == (6, 16, 16, 3)
    assert np.abs(images[0] - images[1]).max() > 1e-3  # different noise per image

    embeds, negative, pooled, negative_pooled, mask, negative_mask = pipe.encode_prompt(
        PROMPTS, num_images_per_prompt=3, return_attention_mask=True
    )
    assert embeds.shape == negative.shape == (6, 77 + T5_TOKENS, 64)
    assert pooled.shape == negative_pooled.shape == (6, 64)
    assert mask.shape == negative_mask.shape == (6, 77 + T5_TOKENS) and mask.dtype == torch.long
    torch.testing.assert_close(embeds[0], embeds[2])  # one prompt's copies are in a row
    assert not torch.equal(embeds[2], embeds[3])


@pytest.mark.parametrize("layout", ["sd3", "clip_t5", "clip"])
def test_text_layouts(layout):
    pipe = _quiet(tiny_mmdit_pipeline(seed=1, layout=layout))
    embeds, _, pooled, _, mask, _ = pipe.encode_prompt(
        PROMPTS, do_classifier_free_guidance=False, return_attention_mask=True
    )
    width = pipe.transformer.config.txt_dim
    assert embeds.shape == (2, 77 + T5_TOKENS, width)
    assert pooled.shape == (2, pipe.transformer.config.cond_dim)
    clip_tokens = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").attention_mask
    torch.testing.assert_close(mask[:, :77], clip_tokens)
    if layout == "clip":  # no T5: masked zeros, as SD3 without T5
        assert embeds[:, 77:].abs().max() == 0 and mask[:, 77:].max() == 0
    else:
        t5_tokens = pipe.tokenizer_3(PROMPTS, padding="max_length", max_length=T5_TOKENS, return_tensors="pt")
        torch.testing.assert_close(mask[:, 77:], t5_tokens.attention_mask)
        if layout == "clip_t5":  # one CLIP (32 wide) zero-padded to the T5 width (64)
            assert embeds[:, :77, 32:].abs().max() == 0
    images = generate(pipe, PROMPTS)
    assert images.shape == (2, 16, 16, 3) and np.abs(images[0] - images[1]).max() > 1e-3


def test_encode_prompt_for_training(pipe):
    """The training code's call: no guidance, masks, an explicit T5 length."""
    embeds, negative, pooled, negative_pooled, mask, negative_mask = pipe.encode_prompt(
        PROMPTS, do_classifier_free_guidance=False, return_attention_mask=True, max_sequence_length=16
    )
    assert embeds.shape == (2, 77 + 16, 64) and pooled.shape == (2, 64) and mask.shape == (2, 77 + 16)
    assert negative is negative_pooled is negative_mask is None
    assert len(pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)) == 4


# ---------------------------------------------------------------------------------------------------------------
# Embeddings, masks, callbacks, latents
# ---------------------------------------------------------------------------------------------------------------
def test_precomputed_embeddings_give_the_same_image(pipe):
    embeds, negative, pooled, negative_pooled, mask, negative_mask = pipe.encode_prompt(
        PROMPTS[0], negative_prompt="a cat", return_attention_mask=True
    )
    from_text = generate(pipe, PROMPTS[0], negative_prompt="a cat")
    from_embeds = generate(
        pipe,
        prompt_embeds=embeds,
        pooled_prompt_embeds=pooled,
        negative_prompt_embeds=negative,
        negative_pooled_prompt_embeds=negative_pooled,
        prompt_attention_mask=mask,
        negative_prompt_attention_mask=negative_mask,
    )
    np.testing.assert_allclose(from_embeds, from_text, atol=1e-6)


def _spy_transformer_masks(pipe):
    seen = []

    def hook(module, args, kwargs):
        seen.append(kwargs.get("encoder_attention_mask"))

    return seen, pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)


def test_mask_reaches_masked_models_only(pipe, unmasked_pipe):
    for model, expect_mask in ((pipe, True), (unmasked_pipe, False)):
        seen, handle = _spy_transformer_masks(model)
        try:
            generate(model, PROMPTS, guidance_scale=3.0)
        finally:
            handle.remove()
        assert len(seen) == STEPS
        if expect_mask:
            assert seen[0].shape == (4, 77 + T5_TOKENS)  # [negative; positive] x 2 prompts
            assert 0 < seen[0].float().mean() < 1
        else:
            assert all(mask is None for mask in seen)


def test_padding_values_do_not_matter_to_a_masked_model(pipe, unmasked_pipe):
    def image_with_noisy_padding(model, noise_scale):
        embeds, negative, pooled, negative_pooled, mask, negative_mask = model.encode_prompt(
            PROMPTS, return_attention_mask=True
        )
        noise = torch.Generator().manual_seed(3)
        noisy = [
            e + noise_scale * torch.randn(e.shape, generator=noise) * (1 - m)[..., None]
            for e, m in ((embeds, mask), (negative, negative_mask))
        ]
        return generate(
            model,
            prompt_embeds=noisy[0],
            negative_prompt_embeds=noisy[1],
            pooled_prompt_embeds=pooled,
            negative_pooled_prompt_embeds=negative_pooled,
            prompt_attention_mask=mask,
            negative_prompt_attention_mask=negative_mask,
        )

    np.testing.assert_allclose(image_with_noisy_padding(pipe, 5.0), image_with_noisy_padding(pipe, 0.0), atol=1e-5)
    # the same change moves an SD3-style (unmasked) model: the check above is not vacuous
    changed = image_with_noisy_padding(unmasked_pipe, 5.0) - image_with_noisy_padding(unmasked_pipe, 0.0)
    assert np.abs(changed).max() > 1e-3


def test_callback_reads_and_modifies_latents(pipe):
    calls = []

    def observe(p, step, timestep, tensors):
        calls.append((step, float(timestep), tensors["latents"].shape, tensors["prompt_embeds"].shape))
        return {}

    plain = generate(pipe, callback_on_step_end=observe,
                     callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    assert [c[0] for c in calls] == list(range(STEPS))
    assert calls[0][2] == (1, LATENT_CHANNELS, 8, 8) and calls[0][3][0] == 2  # guidance batch
    assert calls[0][1] > calls[1][1]
    np.testing.assert_array_equal(plain, generate(pipe))

    def zero_latents(p, step, timestep, tensors):
        return {"latents": torch.zeros_like(tensors["latents"])} if step == STEPS - 1 else {}

    modified = generate(pipe, callback_on_step_end=zero_latents)
    assert np.abs(modified - plain).max() > 1e-3
    by_hand = pipe.decode_latents(torch.zeros(1, LATENT_CHANNELS, 8, 8), output_type="np")
    np.testing.assert_allclose(modified, by_hand, atol=1e-6)


def test_latent_output_decodes_by_hand(pipe):
    latents = generate(pipe, output_type="latent")
    vae = pipe.vae
    with torch.no_grad():
        decoded = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
    by_hand = pipe.image_processor.postprocess(decoded, output_type="np")
    np.testing.assert_allclose(by_hand, generate(pipe, output_type="np"), atol=1e-6)


def test_given_latents_replace_the_noise(pipe):
    noise = torch.randn(1, LATENT_CHANNELS, 8, 8, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(generate(pipe, latents=noise, generator=None), generate(pipe, seed=0))


def test_custom_sigmas_and_dynamic_shift(pipe):
    assert generate(pipe, sigmas=[1.0, 0.6, 0.3], num_inference_steps=3).shape == (1, 16, 16, 3)
    assert pipe.num_timesteps == 3

    dynamic = MMDiTPipeline(**{**pipe.components, "scheduler": FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)})
    _quiet(dynamic)
    sigmas = {}
    for mu in (0.2, 1.5, None):  # None: mu from the image size, as SD3
        sigmas[mu] = (generate(dynamic, mu=mu, num_inference_steps=3), dynamic.scheduler.sigmas.clone())
    assert sigmas[0.2][1][1] < sigmas[1.5][1][1]  # a larger shift keeps more noise
    assert np.abs(sigmas[0.2][0] - sigmas[1.5][0]).max() > 1e-4
    image_tokens = (8 // 2) * (8 // 2)
    expected_mu = calculate_shift(image_tokens, 256, 4096, 0.5, 1.15)
    torch.testing.assert_close(sigmas[None][1], _sigmas_for_mu(dynamic.scheduler, 3, expected_mu))


def _sigmas_for_mu(scheduler, steps, mu):
    reference = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    reference.set_timesteps(steps, mu=mu)
    return reference.sigmas


def test_guidance_off_runs_one_branch(pipe):
    seen, handle = _spy_transformer_masks(pipe)
    try:
        generate(pipe, guidance_scale=1.0)
    finally:
        handle.remove()
    assert seen[0].shape[0] == 1


# ---------------------------------------------------------------------------------------------------------------
# Offload, LoRA
# ---------------------------------------------------------------------------------------------------------------
def test_model_cpu_offload_on_cpu(pipe):
    """Without an accelerator, diffusers refuses `enable_model_cpu_offload()`; naming the CPU as the execution device
    runs the same hook chain (accelerate's `cpu_offload_with_hook`, in `model_cpu_offload_seq` order)."""
    offloaded = _quiet(tiny_mmdit_pipeline(seed=0, layout="sd3", masked=True))
    offloaded.enable_model_cpu_offload(device="cpu")
    order = [name for name in MMDiTPipeline.model_cpu_offload_seq.split("->") if getattr(offloaded, name) is not None]
    hooked = [name for name in order if hasattr(getattr(offloaded, name), "_hf_hook")]
    assert hooked == order
    assert len(offloaded._all_hooks) == len(order)
    np.testing.assert_allclose(generate(offloaded), generate(pipe), atol=1e-6)


class _FakeHook:
    """Stands in for accelerate's offload hook and diffusers' group-offloading hook: `_execution_device` reads
    only these attributes, so devices that this machine does not have can be named."""

    def __init__(self, execution_device=None, onload_device=None):
        self.execution_device = execution_device
        self.config = type("Config", (), {"onload_device": onload_device})()

    def get_hook(self, name):
        return self if name == "group_offloading" else None


def _hook(module, kind: str, device):
    if kind == "accelerate":
        module._hf_hook = _FakeHook(execution_device=device)
    else:
        module._diffusers_hook = _FakeHook(onload_device=device)


EXECUTION_DEVICE_SCENARIOS = {
    "no hooks": ([], torch.device("cpu")),
    "accelerate hook deep in the transformer": (
        [("transformer", "accelerate", None), ("transformer.transformer_blocks.1.img.mlp", "accelerate", "cuda:1")],
        torch.device("cuda:1")),
    "first component without a hook decides": (
        [("vae", "accelerate", None), ("vae.decoder", "accelerate", "cuda:1")], torch.device("cpu")),
    "group offloading wins over accelerate": (
        [("transformer", "accelerate", "cuda:1"), ("text_encoder_3.encoder", "group", torch.device("cuda", 2))],
        torch.device("cuda:2")),
}


@pytest.mark.parametrize("hooks, expected", EXECUTION_DEVICE_SCENARIOS.values(), ids=EXECUTION_DEVICE_SCENARIOS.keys())
def test_execution_device_agrees_with_diffusers(hooks, expected):
    """`MMDiTPipeline._execution_device` replaces diffusers' (a 3 ms module walk per call) with the same answer."""
    hooked = tiny_mmdit_pipeline(seed=0, layout="sd3", masked=True)
    for path, kind, device in hooks:
        component, _, inner = path.partition(".")
        _hook(getattr(hooked, component).get_submodule(inner), kind, device)
    assert hooked._execution_device == DiffusionPipeline._execution_device.fget(hooked) == expected


def test_lora_load_changes_and_unload_restores(pipe, tmp_path):
    base = generate(pipe)
    donor = copy.deepcopy(pipe.transformer)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    donor.add_adapter(config)
    MMDiTPipeline.save_lora_weights(
        tmp_path, transformer_lora_layers=get_peft_model_state_dict(donor),
        transformer_lora_adapter_metadata=config.to_dict(),
    )
    assert os.listdir(tmp_path) == ["pytorch_lora_weights.safetensors"]
    with safe_open(tmp_path / "pytorch_lora_weights.safetensors", "pt") as f:
        assert all(key.startswith("transformer.") and ".lora_" in key for key in f.keys())

    pipe.load_lora_weights(tmp_path, adapter_name="shapes")
    try:
        with_lora = generate(pipe)
        assert np.abs(with_lora - base).max() > 1e-3
        donor_pipe = _quiet(MMDiTPipeline(**{**pipe.components, "transformer": donor}))
        np.testing.assert_allclose(with_lora, generate(donor_pipe), atol=1e-5)  # the same LoRA, scale included
        half = generate(pipe, joint_attention_kwargs={"scale": 0.5})
        assert np.abs(half - base).max() > 1e-4 and np.abs(half - with_lora).max() > 1e-4
        pipe.set_adapters("shapes", 0.0)
        np.testing.assert_allclose(generate(pipe), base, atol=1e-6)
        pipe.set_adapters("shapes", 1.0)
    finally:
        pipe.unload_lora_weights()
    np.testing.assert_array_equal(generate(pipe), base)


# ---------------------------------------------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------------------------------------------
def test_save_and_load_round_trip(pipe, saved_dir):
    index = json.load(open(os.path.join(saved_dir, "model_index.json")))
    assert index["_class_name"] == "MMDiTPipeline"
    assert index["transformer"] == ["mmdit_diffusers", "MMDiTTransformer2DModel"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["text_encoder_3"] == ["transformers", "T5EncoderModel"]
    assert os.path.isfile(os.path.join(saved_dir, "pipeline.py"))

    loaded = _quiet(MMDiTPipeline.from_pretrained(saved_dir))
    assert _public_config(loaded.transformer) == _public_config(pipe.transformer)
    _assert_same_weights(loaded, pipe)
    # Identical weights; images equal up to float rounding (tensors read from safetensors can sit at other memory
    # alignments, which picks other CPU matmul kernels).
    np.testing.assert_allclose(generate(loaded, PROMPTS), generate(pipe, PROMPTS), atol=1e-5)


def _public_config(model):
    return json.loads(json.dumps({k: v for k, v in model.config.items() if not k.startswith("_")}))


def _assert_same_weights(a, b):
    for name, module in a.components.items():
        if isinstance(module, torch.nn.Module):
            other = getattr(b, name).state_dict()
            for key, tensor in module.state_dict().items():
                assert torch.equal(tensor, other[key]), f"{name}.{key}"


def test_round_trip_without_optional_encoders(tmp_path):
    pipe = _quiet(tiny_mmdit_pipeline(seed=2, layout="clip"))
    pipe.save_pretrained(tmp_path)
    index = json.load(open(tmp_path / "model_index.json"))
    assert index["text_encoder_2"] == index["text_encoder_3"] == [None, None]
    loaded = _quiet(MMDiTPipeline.from_pretrained(tmp_path))
    assert loaded.text_encoder_2 is None and loaded.text_encoder_3 is None
    _assert_same_weights(loaded, pipe)
    np.testing.assert_allclose(generate(loaded), generate(pipe), atol=1e-5)


def test_generic_diffusion_pipeline_loading(pipe, saved_dir):
    """`save_pretrained` writes `pipeline.py` (re-exports MMDiTPipeline), which diffusers' generic loader runs."""
    loaded = DiffusionPipeline.from_pretrained(saved_dir, custom_pipeline="pipeline", trust_remote_code=True)
    assert type(loaded) is MMDiTPipeline
    np.testing.assert_allclose(generate(_quiet(loaded)), generate(pipe), atol=1e-5)

    by_file = DiffusionPipeline.from_pretrained(
        saved_dir, custom_pipeline=os.path.join(saved_dir, "pipeline.py"), trust_remote_code=True
    )
    assert type(by_file) is MMDiTPipeline
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(saved_dir, custom_pipeline="pipeline")


def test_diffusers_loader_learns_our_package_only_when_a_hub_repo_is_loaded(saved_dir, monkeypatch):
    """`LOADABLE_CLASSES` (diffusers' global registry) gets "mmdit_diffusers" from `from_pretrained` of a repo id,
    never from importing, nor from loading a local folder (which does not need it)."""
    from diffusers.pipelines import pipeline_loading_utils

    code = ("from mmdit_diffusers.pipelines import MMDiTPipeline; import mmdit_diffusers.training.loop; "
            "from diffusers.pipelines import pipeline_loading_utils as u; print('mmdit_diffusers' in u.LOADABLE_CLASSES)")
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "False"

    monkeypatch.delitem(pipeline_loading_utils.LOADABLE_CLASSES, "mmdit_diffusers", raising=False)
    MMDiTPipeline.from_pretrained(saved_dir)
    assert "mmdit_diffusers" not in pipeline_loading_utils.LOADABLE_CLASSES
    with pytest.raises(OSError):  # offline: the repo cannot be fetched, but the loader was prepared for it
        MMDiTPipeline.from_pretrained("someone/not-downloaded-mmdit", local_files_only=True)
    assert pipeline_loading_utils.LOADABLE_CLASSES["mmdit_diffusers"] == {
        "ModelMixin": ["save_pretrained", "from_pretrained"]}


# ---------------------------------------------------------------------------------------------------------------
# Local tokenizers (mmdit_diffusers.shapes.tokenizers)
# ---------------------------------------------------------------------------------------------------------------
def test_local_tokenizers_load_with_transformers(tmp_path):
    from transformers import AutoTokenizer, CLIPTokenizer, T5TokenizerFast

    from mmdit_diffusers.shapes.tokenizers import build_clip_tokenizer, build_t5_tokenizer

    words = ["red", "circle", "left", "of", "a", "café"]
    build_clip_tokenizer(words, tmp_path / "clip")
    build_t5_tokenizer(words, tmp_path / "t5", model_max_length=64)
    build_clip_tokenizer(list(reversed(words)) + words, tmp_path / "clip-again")

    clip = CLIPTokenizer.from_pretrained(tmp_path / "clip")
    assert type(AutoTokenizer.from_pretrained(tmp_path / "clip")) is CLIPTokenizer
    assert clip.model_max_length == 77 and clip.convert_ids_to_tokens([len(clip) - 2, len(clip) - 1]) == [
        "<|startoftext|>", "<|endoftext|>"]  # CLIP's layout: the special tokens last
    tokens = clip.convert_ids_to_tokens(clip("A red circle left of a café, xyz!").input_ids)
    assert tokens[:7] == ["<|startoftext|>", "a</w>", "red</w>", "circle</w>", "left</w>", "of</w>", "a</w>"]
    assert tokens[-1] == "<|endoftext|>" and "x" in tokens  # unknown words fall back to bytes
    assert (tmp_path / "clip" / "vocab.json").read_text() == (tmp_path / "clip-again" / "vocab.json").read_text()

    t5 = T5TokenizerFast.from_pretrained(tmp_path / "t5")
    assert type(AutoTokenizer.from_pretrained(tmp_path / "t5")).__name__ == type(t5).__name__
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id, t5.model_max_length) == (0, 1, 2, 64)
    tokens = t5.convert_ids_to_tokens(t5("a red circle left of a Xyz").input_ids)
    assert tokens[:6] == ["▁a", "▁red", "▁circle", "▁left", "▁of", "▁a"] and tokens[-1] == "</s>"
    assert "<unk>" not in tokens  # unknown ASCII words fall back to characters


def test_clip_merges_take_the_most_frequent_pair_and_break_ties_by_the_smallest(tmp_path):
    from mmdit_diffusers.shapes.tokenizers import build_clip_tokenizer

    words = ["circle", "circles", "triangle", "triangles", "square", "squares", "red", "green", "left", "right"]
    build_clip_tokenizer(words, tmp_path / "clip")
    merges = [tuple(line.split(" ")) for line in (tmp_path / "clip" / "merges.txt").read_text().splitlines()[1:]]
    spellings = [[*word[:-1], word[-1] + "</w>"] for word in words]
    for merge in merges:  # replay: each merge is the most frequent adjacent pair, the smallest among equals
        counts = collections.Counter(pair for symbols in spellings for pair in zip(symbols, symbols[1:]))
        assert merge == min(pair for pair, n in counts.items() if n == max(counts.values()))
        for symbols in spellings:
            i = 0
            while i + 1 < len(symbols):
                if (symbols[i], symbols[i + 1]) == merge:
                    symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
                i += 1
    assert spellings == [[word + "</w>"] for word in words]  # merged until every word is one token


def test_clip_tokenizer_is_the_same_in_every_process(tmp_path):
    # the `tokenizers` BPE trainer broke ties in hash order: merges (and so token ids) changed between runs
    code = "import sys; from mmdit_diffusers.shapes.tokenizers import build_clip_tokenizer as b; b({}, sys.argv[1])"
    words = ["circle", "circles", "triangle", "triangles", "square", "squares", "purple", "yellow", "above", "below"]
    for run in range(3):
        subprocess.run([sys.executable, "-c", code.format(words), str(tmp_path / str(run))], check=True)
    built = [(tmp_path / str(run) / name).read_text() for run in range(3) for name in ("merges.txt", "vocab.json")]
    assert built[0::2] == [built[0]] * 3 and built[1::2] == [built[1]] * 3


@pytest.mark.parametrize("image_tokens", [16, 256, 1024, 4096])
def test_dynamic_shift_mu_equals_diffusers_calculate_shift(image_tokens):
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    from mmdit_diffusers.pipelines.pipeline_mmdit import resolution_shift_mu

    args = (image_tokens, 256, 4096, 0.5, 1.16)
    assert resolution_shift_mu(*args) == pytest.approx(calculate_shift(*args), abs=1e-12)
