"""diffusers' SD3 pipeline fast tests, run on `MMDiTPipeline`: `StableDiffusion3PipelineFastTests` from
`tests/pipelines/stable_diffusion_3/test_pipeline_stable_diffusion_3.py` of huggingface/diffusers at 58eb52c080
(Apache-2.0), with its `PipelineTesterMixin` (`diffusers_pipeline_testing.py`). Test bodies and tolerances are
diffusers'. Adaptations, each marked `# adaptation` below:

1. Class names: `pipeline_class = MMDiTPipeline`; the dummy transformer is diffusers' dummy `SD3Transformer2DModel`
   (same config, same seed) converted by `MMDiTTransformer2DModel.from_sd3`, so the weights are the ones diffusers
   tests (a freshly built MMDiT would output zeros: its gates start at zero).
2. No network: the tokenizers `hf-internal-testing/tiny-random-clip` and `hf-internal-testing/tiny-random-t5` are
   built locally over the test prompt's words (`mmdit_diffusers.shapes.tokenizers`); the T5 config read from
   `hf-internal-testing/tiny-random-t5` is written out (d_model 32, d_ff 37, d_kv 8, 4 heads, 5 layers, 8 relative
   attention buckets, vocabulary 1103, ReLU feed-forward).
3. `image_encoder` / `feature_extractor` (SD3.5's IP-Adapter components) are not arguments of MMDiTPipeline: they
   are left out of the dummy components.
4. `test_inference`: diffusers' expected slice was recorded with the Hub tokenizers, which are not here; the
   expected values are `StableDiffusion3Pipeline`'s on the same components (same slice, same atol). Both run with
   the text encoders in eval mode: the dummy T5 is built in training mode (dropout 0.1), and SD3 encodes positive and
   negative prompts in two T5 calls where MMDiTPipeline batches them in one, so they would draw different dropout.
5. `test_encode_prompt_works_in_isolation`: diffusers' `ReturnNameVisitor` finds the pipeline class by name in
   `diffusers.pipelines`; the test puts MMDiTPipeline there for its duration.
6. `test_fused_qkv_projections`: SD3's attention fuses by swapping in `Fused*` processors (and keeps
   `original_attn_processors`); ours, like diffusers' FLUX-family attention (`AttentionModuleMixin`), fuses the
   projection layers in place under the same processor. The fusion check is the one diffusers uses for those
   (`check_qkv_fused_layers_exist`, here on both streams: `to_qkv` and `to_added_qkv`); the processor count is
   compared with the processors before fusing. The three image comparisons are unchanged.
7. diffusers' mixin sets logger levels and leaves them set (`_test_inference_batch_consistent` leaves the
   pipeline module's logger at WARNING); a fixture puts every logger's level back after each test, so that the
   rest of this repository's suite sees the levels it sets.

Tests that need an accelerator (`require_accelerator`, `require_torch_accelerator`, float16 on CUDA / XPU, xformers
on CUDA) are skipped on a CPU-only machine by diffusers' own decorators, as in diffusers: test_float16_inference,
test_save_load_float16, test_to_device, test_sequential_cpu_offload_forward_pass, test_model_cpu_offload_forward_pass,
test_cpu_offload_forward_pass_twice, test_sequential_offload_forward_pass_twice,
test_xformers_attention_forwardGenerator_pass, test_group_offloading_inference,
test_pipeline_level_group_offloading_sanity_checks, test_pipeline_level_group_offloading_inference.
"""

import functools
import logging
import os
import tempfile
import unittest
from unittest import mock

import diffusers
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel

from diffusers_pipeline_testing import (
    PipelineTesterMixin,
    check_qkv_fused_layers_exist,
    check_qkv_fusion_matches_attn_procs_length,
    torch_device,
)
from mmdit_diffusers import MMDiTPipeline, MMDiTTransformer2DModel
from mmdit_diffusers.shapes.tokenizers import build_clip_tokenizer, build_t5_tokenizer

PROMPT = "A painting of a squirrel eating a burger"


@pytest.fixture(autouse=True)
def restore_logger_levels():
    # adaptation 7
    def loggers():
        known = logging.Logger.manager.loggerDict.values()
        return [logging.getLogger(), *(logger for logger in known if isinstance(logger, logging.Logger))]

    levels = {logger: logger.level for logger in loggers()}
    yield
    for logger in loggers():
        logger.setLevel(levels.get(logger, logging.NOTSET))


@functools.lru_cache(maxsize=None)
def _local_tokenizer_dirs() -> tuple[str, str]:
    # adaptation 2: hf-internal-testing/tiny-random-clip and tiny-random-t5, built here
    root = tempfile.mkdtemp(prefix="peer-sd3-tokenizers-")
    words = PROMPT.lower().split() + ["very", "long"]
    return (
        build_clip_tokenizer(words, os.path.join(root, "clip"), model_max_length=77),
        build_t5_tokenizer(words, os.path.join(root, "t5"), model_max_length=512),
    )


def _tiny_random_t5_config() -> T5Config:
    # adaptation 2: AutoConfig.from_pretrained("hf-internal-testing/tiny-random-t5"), written out
    return T5Config(
        vocab_size=1103, d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=5, relative_attention_num_buckets=8,
        feed_forward_proj="relu",
    )


def sd3_dummy_components():
    """diffusers' `StableDiffusion3PipelineFastTests.get_dummy_components`, with the local tokenizers and T5 config."""
    clip_dir, t5_dir = _local_tokenizer_dirs()
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
    )
    clip_text_encoder_config = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=2,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        pad_token_id=1,
        vocab_size=1000,
        hidden_act="gelu",
        projection_dim=32,
    )

    torch.manual_seed(0)
    text_encoder = CLIPTextModelWithProjection(clip_text_encoder_config)

    torch.manual_seed(0)
    text_encoder_2 = CLIPTextModelWithProjection(clip_text_encoder_config)

    torch.manual_seed(0)
    config = _tiny_random_t5_config()
    text_encoder_3 = T5EncoderModel(config)

    tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
    tokenizer_2 = CLIPTokenizer.from_pretrained(clip_dir)
    tokenizer_3 = AutoTokenizer.from_pretrained(t5_dir)

    torch.manual_seed(0)
    vae = AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )

    scheduler = FlowMatchEulerDiscreteScheduler()

    return {
        "scheduler": scheduler,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "text_encoder_3": text_encoder_3,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "tokenizer_3": tokenizer_3,
        "transformer": transformer,
        "vae": vae,
        "image_encoder": None,
        "feature_extractor": None,
    }


class MMDiTPipelineSD3FastTests(unittest.TestCase, PipelineTesterMixin):
    pipeline_class = MMDiTPipeline  # adaptation 1
    params = frozenset(
        [
            "prompt",
            "height",
            "width",
            "guidance_scale",
            "negative_prompt",
            "prompt_embeds",
            "negative_prompt_embeds",
        ]
    )
    batch_params = frozenset(["prompt", "negative_prompt"])
    test_layerwise_casting = True
    test_group_offloading = True

    def get_dummy_components(self):
        components = sd3_dummy_components()
        components["transformer"] = MMDiTTransformer2DModel.from_sd3(components["transformer"])  # adaptation 1
        del components["image_encoder"], components["feature_extractor"]  # adaptation 3
        return components

    def get_dummy_inputs(self, device, seed=0):
        if str(device).startswith("mps"):
            generator = torch.manual_seed(seed)
        else:
            generator = torch.Generator(device="cpu").manual_seed(seed)

        inputs = {
            "prompt": PROMPT,
            "generator": generator,
            "num_inference_steps": 2,
            "guidance_scale": 5.0,
            "output_type": "np",
        }
        return inputs

    def test_inference(self):
        components = self.get_dummy_components()
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):  # adaptation 4
            components[name].eval()
        pipe = self.pipeline_class(**components)

        inputs = self.get_dummy_inputs(torch_device)
        image = pipe(**inputs).images[0]
        generated_slice = image.flatten()
        generated_slice = np.concatenate([generated_slice[:8], generated_slice[-8:]])

        # adaptation 4: StableDiffusion3Pipeline's slice on the same components
        sd3_components = sd3_dummy_components()
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            sd3_components[name].eval()
        expected_image = StableDiffusion3Pipeline(**sd3_components)(**self.get_dummy_inputs(torch_device)).images[0]
        expected_slice = expected_image.flatten()
        expected_slice = np.concatenate([expected_slice[:8], expected_slice[-8:]])

        self.assertTrue(
            np.allclose(generated_slice, expected_slice, atol=1e-3), "Output does not match expected slice."
        )

    def test_fused_qkv_projections(self):
        device = "cpu"  # ensure determinism for the device-dependent torch.Generator
        components = self.get_dummy_components()
        pipe = self.pipeline_class(**components)
        pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=None)

        inputs = self.get_dummy_inputs(device)
        image = pipe(**inputs).images
        original_image_slice = image[0, -3:, -3:, -1]

        # TODO (sayakpaul): will refactor this once `fuse_qkv_projections()` has been added
        # to the pipeline level.
        original_attn_processors = pipe.transformer.attn_processors  # adaptation 6
        pipe.transformer.fuse_qkv_projections()
        # adaptation 6: diffusers' check for attention modules that fuse in place (its FLUX-family tests), on both
        # streams' projections
        assert check_qkv_fused_layers_exist(pipe.transformer, ["to_qkv", "to_added_qkv"]), (
            "Something wrong with the fused attention processors. Expected all the attention processors to be fused."
        )
        assert check_qkv_fusion_matches_attn_procs_length(
            pipe.transformer, original_attn_processors
        ), "Something wrong with the attention processors concerning the fused QKV projections."

        inputs = self.get_dummy_inputs(device)
        image = pipe(**inputs).images
        image_slice_fused = image[0, -3:, -3:, -1]

        pipe.transformer.unfuse_qkv_projections()
        inputs = self.get_dummy_inputs(device)
        image = pipe(**inputs).images
        image_slice_disabled = image[0, -3:, -3:, -1]

        assert np.allclose(original_image_slice, image_slice_fused, atol=1e-3, rtol=1e-3), (
            "Fusion of QKV projections shouldn't affect the outputs."
        )
        assert np.allclose(image_slice_fused, image_slice_disabled, atol=1e-3, rtol=1e-3), (
            "Outputs, with QKV projection fusion enabled, shouldn't change when fused QKV projections are disabled."
        )
        assert np.allclose(original_image_slice, image_slice_disabled, atol=1e-2, rtol=1e-2), (
            "Original outputs should match when fused QKV projections are disabled."
        )

    def test_skip_guidance_layers(self):
        components = self.get_dummy_components()
        pipe = self.pipeline_class(**components)
        pipe = pipe.to(torch_device)
        pipe.set_progress_bar_config(disable=None)

        inputs = self.get_dummy_inputs(torch_device)

        output_full = pipe(**inputs)[0]

        inputs_with_skip = inputs.copy()
        inputs_with_skip["skip_guidance_layers"] = [0]
        output_skip = pipe(**inputs_with_skip)[0]

        self.assertFalse(
            np.allclose(output_full, output_skip, atol=1e-5), "Outputs should differ when layers are skipped"
        )

        self.assertEqual(output_full.shape, output_skip.shape, "Outputs should have the same shape")

        inputs["num_images_per_prompt"] = 2
        output_full = pipe(**inputs)[0]

        inputs_with_skip = inputs.copy()
        inputs_with_skip["skip_guidance_layers"] = [0]
        output_skip = pipe(**inputs_with_skip)[0]

        self.assertFalse(
            np.allclose(output_full, output_skip, atol=1e-5), "Outputs should differ when layers are skipped"
        )

        self.assertEqual(output_full.shape, output_skip.shape, "Outputs should have the same shape")

    def test_encode_prompt_works_in_isolation(self, extra_required_param_value_dict=None, atol=1e-4, rtol=1e-4):
        # adaptation 5
        with mock.patch.object(diffusers.pipelines, self.pipeline_class.__name__, self.pipeline_class, create=True):
            super().test_encode_prompt_works_in_isolation(extra_required_param_value_dict, atol, rtol)
