"""diffusers' SD3 transformer tests (`tests/models/transformers/test_models_transformer_sd3.py` at huggingface/diffusers
58eb52c080), ported to `MMDiTTransformer2DModel`, with the mixins they use (`diffusers_model_testing.py`).

Adaptations (configs and class names only, no assertion weakened):
- Model class: `MMDiTTransformer2DModel`. Configs: diffusers' SD3 and SD3.5 test configs, translated by
  `mmdit_diffusers.conversion.sd3.sd3_config_to_mmdit` (the same model: hidden 32, 4 blocks, 4 heads, patch 1,
  latents 4 x 32 x 32, text width 32, pooled 64, position grid 96; SD3.5: RMS QK-norm, dual attention in block 0).
  Dummy inputs: diffusers' own, unchanged.
- Every test class runs twice: as in diffusers (a freshly constructed model) and with random weights
  (`RandomWeights` variants: every parameter redrawn from N(0, 0.1) by a fixed generator at construction). Our
  AdaLN gates and output projection start at zero, as in the MMDiT paper, so a fresh model outputs exact zeros and
  comparisons of outputs between fresh models hold trivially; the random-weight runs make them real.
- `test_skip_layers` (SD3.5) runs on random weights only: on a fresh model every block is the identity, so skipping
  one changes nothing, and its `not allclose` assertion cannot hold (SD3's fresh blocks are not the identity).
- `test_gradient_checkpointing_is_applied`: `expected_set` names our class (`{"SD3Transformer2DModel"}` in diffusers).
- `test_torch_compile_repeated_blocks` (which skips for SD3: it has no `_repeated_blocks`) gets
  `recompile_limit` = the number of kinds of block (2 for SD3, 3 for SD3.5), as diffusers' tests of models with
  block variants set it.
- Mixins: see `diffusers_model_testing.py` (CPU by default, `DIFFUSERS_TEST_DEVICE` picks another device as in
  diffusers; accelerator-only tests are added only on an accelerator; compile tests use aot_eager on the CPU).
- Not ported: the LoRA mixin (`LoraTesterMixin`: diffusers' PEFT round trips, covered for our class in
  tests/test_transformer.py), single-file loading (downloads the SD3 checkpoint from the Hub; our single-file
  support is tested with a local checkpoint elsewhere), BitsAndBytes and TorchAO quantization (they download
  `hf-internal-testing/tiny-sd35-pipe` and need CUDA).
"""

from __future__ import annotations

import functools

import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor
from diffusers_model_testing import (
    AcceleratorInferenceTesterMixin,
    AcceleratorTrainingTesterMixin,
    BaseModelTesterConfig,
    ModelTesterMixin,
    TorchCompileTesterMixin,
    TrainingTesterMixin,
    full_determinism,  # noqa: F401  (the mixins' fixture; a conftest here would shadow tests/conftest.py's module)
    torch_device,
)

from mmdit_diffusers import MMDiTTransformer2DModel
from mmdit_diffusers.conversion.sd3 import sd3_config_to_mmdit

ON_ACCELERATOR = torch_device in ("cuda", "xpu")
MODEL_MIXINS = (ModelTesterMixin, AcceleratorInferenceTesterMixin) if ON_ACCELERATOR else (ModelTesterMixin,)
TRAINING_MIXINS = (TrainingTesterMixin, AcceleratorTrainingTesterMixin) if ON_ACCELERATOR else (TrainingTesterMixin,)


class RandomWeightsMMDiTTransformer2DModel(MMDiTTransformer2DModel):
    """`MMDiTTransformer2DModel` whose every parameter is redrawn at construction from N(0, 0.1), always the same
    values (a generator of its own), so that two constructions are the same model, as diffusers' tests expect."""

    @functools.wraps(MMDiTTransformer2DModel.__init__)  # diffusers' config machinery reads the signature
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        g = torch.Generator().manual_seed(1234)
        with torch.no_grad():
            for param in self.parameters():
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)


# ======================== SD3 Transformer ========================

SD3_TEST_CONFIG = {
    "sample_size": 32,
    "patch_size": 1,
    "in_channels": 4,
    "num_layers": 4,
    "attention_head_dim": 8,
    "num_attention_heads": 4,
    "caption_projection_dim": 32,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 64,
    "out_channels": 4,
    "pos_embed_max_size": 96,
    "dual_attention_layers": (),
    "qk_norm": None,
}
SD35_TEST_CONFIG = {**SD3_TEST_CONFIG, "dual_attention_layers": (0,), "qk_norm": "rms_norm"}


class SD3TransformerTesterConfig(BaseModelTesterConfig):
    sd3_config = SD3_TEST_CONFIG

    @property
    def model_class(self):
        return MMDiTTransformer2DModel

    @property
    def main_input_name(self) -> str:
        return "hidden_states"

    @property
    def model_split_percents(self) -> list:
        return [0.8, 0.8, 0.9]

    @property
    def output_shape(self) -> tuple:
        return (4, 32, 32)

    @property
    def input_shape(self) -> tuple:
        return (4, 32, 32)

    @property
    def generator(self):
        return torch.Generator("cpu").manual_seed(0)

    def get_init_dict(self) -> dict:
        return sd3_config_to_mmdit(self.sd3_config)

    def get_dummy_inputs(self, batch_size: int = 2) -> dict[str, torch.Tensor]:
        num_channels = 4
        height = width = embedding_dim = 32
        pooled_embedding_dim = embedding_dim * 2
        sequence_length = 154

        return {
            "hidden_states": randn_tensor(
                (batch_size, num_channels, height, width), generator=self.generator, device=torch_device
            ),
            "encoder_hidden_states": randn_tensor(
                (batch_size, sequence_length, embedding_dim), generator=self.generator, device=torch_device
            ),
            "pooled_projections": randn_tensor(
                (batch_size, pooled_embedding_dim), generator=self.generator, device=torch_device
            ),
            "timestep": torch.randint(0, 1000, size=(batch_size,), generator=self.generator).to(torch_device),
        }


class RandomWeights:
    """Mixed in first: the config's model class with random weights."""

    @property
    def model_class(self):
        return RandomWeightsMMDiTTransformer2DModel


class TestSD3Transformer(SD3TransformerTesterConfig, *MODEL_MIXINS):
    pass


class TestSD3TransformerRandomWeights(RandomWeights, SD3TransformerTesterConfig, *MODEL_MIXINS):
    pass


class TestSD3TransformerTraining(SD3TransformerTesterConfig, *TRAINING_MIXINS):
    def test_gradient_checkpointing_is_applied(self):
        expected_set = {"MMDiTTransformer2DModel"}
        super().test_gradient_checkpointing_is_applied(expected_set=expected_set)


class TestSD3TransformerTrainingRandomWeights(RandomWeights, SD3TransformerTesterConfig, *TRAINING_MIXINS):
    def test_gradient_checkpointing_is_applied(self):
        expected_set = {"RandomWeightsMMDiTTransformer2DModel"}
        super().test_gradient_checkpointing_is_applied(expected_set=expected_set)


@pytest.mark.slow  # dynamo traces the whole model (~5-10 s a test on a small CPU)
class TestSD3TransformerCompile(SD3TransformerTesterConfig, TorchCompileTesterMixin):
    def test_torch_compile_repeated_blocks(self):
        # two kinds of block: the last one's text stream is pre-only (SD3's `context_pre_only`), so it compiles once
        # more; as diffusers' tests of models with such variants pass (Wan VACE, Z-Image, UNet2DCondition)
        super().test_torch_compile_repeated_blocks(recompile_limit=2)


# ======================== SD3.5 Transformer ========================


class SD35TransformerTesterConfig(SD3TransformerTesterConfig):
    sd3_config = SD35_TEST_CONFIG


class SkipLayersTest:
    def test_skip_layers(self):
        init_dict = self.get_init_dict()
        inputs_dict = self.get_dummy_inputs()
        model = self.model_class(**init_dict).to(torch_device)

        output_full = model(**inputs_dict).sample

        inputs_dict_with_skip = inputs_dict.copy()
        inputs_dict_with_skip["skip_layers"] = [0]
        output_skip = model(**inputs_dict_with_skip).sample

        assert not torch.allclose(output_full, output_skip, atol=1e-5), "Outputs should differ when layers are skipped"
        assert output_full.shape == output_skip.shape, "Outputs should have the same shape"


class TestSD35Transformer(SD35TransformerTesterConfig, *MODEL_MIXINS):
    pass


class TestSD35TransformerRandomWeights(RandomWeights, SD35TransformerTesterConfig, SkipLayersTest, *MODEL_MIXINS):
    pass


class TestSD35TransformerTraining(SD35TransformerTesterConfig, *TRAINING_MIXINS):
    def test_gradient_checkpointing_is_applied(self):
        expected_set = {"MMDiTTransformer2DModel"}
        super().test_gradient_checkpointing_is_applied(expected_set=expected_set)


class TestSD35TransformerTrainingRandomWeights(RandomWeights, SD35TransformerTesterConfig, *TRAINING_MIXINS):
    def test_gradient_checkpointing_is_applied(self):
        expected_set = {"RandomWeightsMMDiTTransformer2DModel"}
        super().test_gradient_checkpointing_is_applied(expected_set=expected_set)


@pytest.mark.slow
class TestSD35TransformerCompile(SD35TransformerTesterConfig, TorchCompileTesterMixin):
    def test_torch_compile_repeated_blocks(self):
        # three kinds of block: dual attention (block 0), plain, pre-only text (the last)
        super().test_torch_compile_repeated_blocks(recompile_limit=3)
