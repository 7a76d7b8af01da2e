"""LoRA files from the wild on `MMDiTPipeline`: kohya-style SD3 / SD3.5 files, diffusers-format files with
text-encoder keys, and files nothing can be loaded from. References are `StableDiffusion3Pipeline.load_lora_weights`
on the same tiny random pipeline (saved once, loaded by both classes) and the same random LoRA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import save_file

from lora_fixtures import CLIP_TARGETS, peft_lora
from mmdit_diffusers import InputError, MMDiTPipeline
from sd3_original_layout import peft_lora_to_kohya, tiny_sd3_single_file_pipeline
from tiny_pipeline import _seeded, tiny_mmdit_pipeline


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    """A tiny SD3.5-like pipeline (QK-norm, a dual-attention block; CLIP-L 32 and CLIP-G 48 wide), saved."""
    folder = tmp_path_factory.mktemp("lora-files") / "sd3"
    tiny_sd3_single_file_pipeline(seed=0).save_pretrained(folder)
    return str(folder)


def _pipelines(folder):
    sd3 = StableDiffusion3Pipeline.from_pretrained(folder)
    ours = MMDiTPipeline.from_pretrained(folder)
    for pipe in (sd3, ours):
        pipe.set_progress_bar_config(disable=True)
    return sd3, ours


def _images(pipe, **call) -> np.ndarray:
    return pipe("a red circle left of a blue square", num_inference_steps=2, height=16, width=16, output_type="np",
                generator=torch.Generator().manual_seed(0), **call).images


def _random_lora(pipe: StableDiffusion3Pipeline, transformer_modules=None, seed: int = 0) -> dict[str, torch.Tensor]:
    """A diffusers-format LoRA (rank 2) on every Linear / Conv2d of SD3's transformer whose name ends with one of
    `transformer_modules` (default: all of them, so the norms' (scale, shift) halves, the fused QKV and the patch
    convolution are in) and on the CLIPs' attention and MLP layers; random, not small."""
    lora, rank = {}, 2
    with _seeded(seed):
        for component in ("transformer", "text_encoder", "text_encoder_2"):
            targets = transformer_modules if component == "transformer" else CLIP_TARGETS
            for name, module in getattr(pipe, component).named_modules():
                if targets is not None and not name.endswith(tuple(targets)):
                    continue
                if isinstance(module, torch.nn.Linear):
                    a, b = (rank, module.in_features), (module.out_features, rank)
                elif isinstance(module, torch.nn.Conv2d):
                    a, b = (rank, module.in_channels, *module.kernel_size), (module.out_channels, rank, 1, 1)
                else:
                    continue
                lora[f"{component}.{name}.lora_A.weight"] = torch.randn(a) * 0.3
                lora[f"{component}.{name}.lora_B.weight"] = torch.randn(b) * 0.3
    return lora


@pytest.mark.parametrize(
    "transformer_modules",
    [None, ["to_q", "to_k", "to_v", "proj_out"]],  # the second: only modules named alike in SD3's naming and ours
    ids=["every-module", "attention-and-final-layer"],
)
def test_kohya_sd3_lora_equals_sd3_with_the_same_lora_in_diffusers_format(sd3_folder, transformer_modules, tmp_path):
    sd3, ours = _pipelines(sd3_folder)
    base = _images(ours)
    lora = _random_lora(sd3, transformer_modules)
    kohya = peft_lora_to_kohya(lora, depth=sd3.transformer.config.num_layers)
    assert any(k.startswith("lora_te1_") for k in kohya) and any(k.startswith("lora_te2_") for k in kohya)
    save_file(kohya, tmp_path / "kohya_sd35_lora.safetensors")

    sd3.load_lora_weights(lora)  # diffusers' SD3 loads kohya files' keys nowhere, so it gets the diffusers form
    ours.load_lora_weights(str(tmp_path / "kohya_sd35_lora.safetensors"))
    expected = _images(sd3)
    assert np.abs(expected - base).max() > 1e-2
    np.testing.assert_allclose(_images(ours), expected, atol=1e-4, rtol=0)


def test_diffusers_lora_file_with_text_encoder_keys_equals_sd3_on_the_same_file(sd3_folder, tmp_path):
    sd3, ours = _pipelines(sd3_folder)
    base = _images(ours)
    layers, metadata = {}, {}
    # SD3's `ff_context` names the file as SD3's (its `proj_out` rows are in SD3's order; see
    # `convert_lora_state_dict` for a file with none of SD3's own module names)
    transformer_targets = ["to_q", "to_k", "to_v", "add_k_proj", "to_add_out", "ff_context.net.2", "proj_out"]
    for seed, (name, targets) in enumerate((("transformer", transformer_targets),
                                            ("text_encoder", CLIP_TARGETS), ("text_encoder_2", ["q_proj", "fc2"]))):
        layers[f"{name}_lora_layers"], metadata[f"{name}_lora_adapter_metadata"] = peft_lora(
            getattr(sd3, name), targets, seed=1 + seed)
    StableDiffusion3Pipeline.save_lora_weights(tmp_path, **layers, **metadata)  # diffusers' own writer
    sd3, _ = _pipelines(sd3_folder)
    sd3.load_lora_weights(tmp_path)
    ours.load_lora_weights(tmp_path, adapter_name="style")
    assert "style" in ours.text_encoder.peft_config and "style" in ours.text_encoder_2.peft_config
    expected = _images(sd3)
    assert np.abs(expected - base).max() > 1e-2
    np.testing.assert_allclose(_images(ours), expected, atol=1e-4, rtol=0)
    half = {"joint_attention_kwargs": {"scale": 0.5}}  # scales the CLIPs' LoRAs too, as SD3
    expected_half = _images(sd3, **half)
    assert np.abs(expected_half - expected).max() > 1e-3
    np.testing.assert_allclose(_images(ours, **half), expected_half, atol=1e-4, rtol=0)
    ours.unload_lora_weights()  # text encoders included
    np.testing.assert_allclose(_images(ours), base, atol=1e-6, rtol=0)


def test_unprefixed_peft_state_dict_is_the_transformers(pipe):
    donor = tiny_mmdit_pipeline(seed=0).transformer
    donor.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "fc1"], init_lora_weights=False))
    unprefixed = get_peft_model_state_dict(donor)
    try:
        pipe.load_lora_weights({f"transformer.{k}": v for k, v in unprefixed.items()}, adapter_name="prefixed")
        prefixed = _images(pipe)
        pipe.unload_lora_weights()
        pipe.load_lora_weights(unprefixed, adapter_name="bare")
        np.testing.assert_allclose(_images(pipe), prefixed, atol=1e-6, rtol=0)
    finally:
        pipe.unload_lora_weights()


def test_files_without_usable_keys_are_refused_naming_what_they_hold(pipe):
    with pytest.raises(InputError, match=r"no usable key: 3 of its 3 keys, e\.g\. \['model\.a\.weight'"):
        pipe.load_lora_weights({f"model.{c}.weight": torch.zeros(2, 2) for c in "abc"})
    lycoris = {"lora_unet_joint_blocks_0_x_block_attn_qkv.hada_w1_a": torch.zeros(2, 2),
               "lora_unet_joint_blocks_0_x_block_attn_qkv.alpha": torch.tensor(1.0)}
    with pytest.raises(InputError, match=r"Cannot convert 2 of the kohya LoRA file's 2 keys.*hada_w1_a"):
        pipe.load_lora_weights(lycoris)
    sdxl = {"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(2, 8),
            "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(8, 2)}
    with pytest.raises(InputError, match="not a module of the original SD3"):
        pipe.load_lora_weights(sdxl)
    t5 = {"lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": torch.zeros(2, 8),
          "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight": torch.zeros(8, 2)}
    with pytest.raises(InputError, match="T5"):
        pipe.load_lora_weights(t5)


def test_text_encoder_keys_for_an_encoder_the_pipeline_lacks_are_refused():
    clip_only = tiny_mmdit_pipeline(seed=0, layout="clip")
    lora = {"text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 32),
            "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 2)}
    with pytest.raises(InputError, match=r"no usable key: 2 of its 2 keys.*This pipeline has no \['text_encoder_2'\]"):
        clip_only.load_lora_weights(lora)
