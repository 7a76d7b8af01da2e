"""`from_single_file`: Stability AI's original SD3 / SD3.5 single-file layout (and GGUF) into our transformer and
pipeline, against diffusers' SD3 on the same tiny random weights. The files are written by the test
(tests/sd3_original_layout.py), and diffusers' own `from_single_file` reading them back to the same weights shows
the layout is the real one."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from diffusers import GGUFQuantizationConfig, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.quantizers.gguf.utils import GGUFLinear
from safetensors.torch import save_file

from mmdit_diffusers import InputError, MMDiTPipeline, MMDiTTransformer2DModel
from mmdit_diffusers.conversion import sd3_config_to_mmdit
from sd3_original_layout import original_pipeline_checkpoint, sd3_to_original, tiny_sd3_single_file_pipeline
from tiny_pipeline import _randomize, _seeded, tiny_sd3_transformer


def _sd3(seed: int = 0, **config) -> SD3Transformer2DModel:
    defaults = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=32,
                    num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=64, pooled_projection_dim=32,
                    out_channels=4, pos_embed_max_size=16)
    with _seeded(seed):
        return _randomize(SD3Transformer2DModel(**{**defaults, **config}), 0.05)


def _outputs(model, sd3_config, seed: int = 1) -> torch.Tensor:
    """The transformer's prediction on fixed random inputs: batch 2, non-square latents, distinct timesteps."""
    g = torch.Generator().manual_seed(seed)
    inputs = dict(
        hidden_states=torch.randn(2, sd3_config.in_channels, 8, 6, generator=g),
        encoder_hidden_states=torch.randn(2, 7, sd3_config.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(2, sd3_config.pooled_projection_dim, generator=g),
        timestep=torch.tensor([900.0, 10.0]),
    )
    with torch.no_grad():
        return model(**inputs).sample


def _write(state_dict, path) -> str:
    save_file(state_dict, path)
    return str(path)


@pytest.mark.parametrize(
    "config",
    [
        dict(qk_norm="rms_norm", dual_attention_layers=(0,), attention_head_dim=16, num_attention_heads=4),  # SD3.5 M
        dict(attention_head_dim=64, num_attention_heads=2, caption_projection_dim=128),  # SD3 M: heads of 64, no QK-norm
    ],
    ids=["sd3.5-medium-like", "sd3-medium-like"],
)
def test_transformer_from_original_file_matches_sd3(config, tmp_path):
    sd3 = _sd3(**config)
    path = _write(sd3_to_original(sd3.state_dict()), tmp_path / "sd3.safetensors")
    # the file is the real layout: diffusers' own converter reads it back to the same weights
    theirs = SD3Transformer2DModel.from_single_file(path, config=str(_saved(sd3, tmp_path)))
    assert all(torch.equal(theirs.state_dict()[k], v) for k, v in sd3.state_dict().items())

    ours = MMDiTTransformer2DModel.from_single_file(path)  # config read off the tensors
    expected = sd3_config_to_mmdit(sd3.config)
    assert {k: ours.config[k] for k in expected} == expected
    torch.testing.assert_close(_outputs(ours, sd3.config), _outputs(sd3, sd3.config), atol=1e-5, rtol=0)


def _saved(model, tmp_path):
    folder = tmp_path / "sd3-transformer"
    model.save_pretrained(folder)
    return folder


def test_heads_that_break_sd3s_convention_need_config_or_num_heads(tmp_path):
    sd3 = tiny_sd3_transformer(seed=0)  # 4 heads of 8, no QK-norm: the file does not say how many heads
    path = _write(sd3_to_original(sd3.state_dict()), tmp_path / "sd3.safetensors")
    with pytest.raises(InputError, match="num_heads"):
        MMDiTTransformer2DModel.from_single_file(path)
    expected = _outputs(sd3, sd3.config)
    from_config = MMDiTTransformer2DModel.from_single_file(path, config=str(_saved(sd3, tmp_path)))
    from_heads = MMDiTTransformer2DModel.from_single_file(path, num_heads=4)
    for ours in (from_config, from_heads):
        assert ours.config.num_heads == 4
        torch.testing.assert_close(_outputs(ours, sd3.config), expected, atol=1e-5, rtol=0)


def test_dtype_state_dict_and_config_overrides():
    sd3 = _sd3(qk_norm="rms_norm", attention_head_dim=16, num_attention_heads=4)
    half = {k: v.half() for k, v in sd3_to_original(sd3.state_dict(), prefix="").items()}  # no prefix, as GGUF files
    ours = MMDiTTransformer2DModel.from_single_file(half, dtype=torch.bfloat16, use_text_attention_mask=True)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16} and ours.config.use_text_attention_mask
    default = MMDiTTransformer2DModel.from_single_file(half)  # float32, as diffusers' from_single_file
    assert {p.dtype for p in default.parameters()} == {torch.float32}
    # the fp16 weights in SD3; its position table stays float32: ours is computed, not read (as `from_sd3`)
    table = "pos_embed.pos_embed"
    sd3.load_state_dict({k: v if k == table else v.half().float() for k, v in sd3.state_dict().items()})
    torch.testing.assert_close(_outputs(default, sd3.config), _outputs(sd3, sd3.config), atol=1e-5, rtol=0)


def test_files_that_are_not_original_sd3_are_refused_naming_their_keys(tmp_path):
    flux_like = {f"double_blocks.{i}.img_attn.qkv.weight": torch.zeros(3, 1) for i in range(3)}
    with pytest.raises(InputError, match=r"not an original-layout SD3.*3 keys, e\.g\. \['double_blocks\.0"):
        MMDiTTransformer2DModel.from_single_file(flux_like)
    original = sd3_to_original(_sd3().state_dict())
    original["model.diffusion_model.joint_blocks.0.x_block.lora_up.weight"] = torch.zeros(1)
    with pytest.raises(InputError, match=r"no counterpart: 1 keys, e\.g\. \['joint_blocks\.0\.x_block\.lora_up"):
        MMDiTTransformer2DModel.from_single_file(original)
    with pytest.raises(InputError, match="no file at"):
        MMDiTTransformer2DModel.from_single_file(str(tmp_path / "missing.safetensors"))
    with pytest.raises(InputError, match=r"unexpected arguments \['num_layers'\]"):
        MMDiTTransformer2DModel.from_single_file(original, num_layers=2)  # SD3's name; ours is `depth`


def _write_gguf(original: dict[str, torch.Tensor], path) -> str:
    """As GGUF converters do: Linear weights whose rows split into 32-blocks as Q8_0, the rest float32."""
    writer = gguf.GGUFWriter(str(path), "sd3")
    for key, tensor in original.items():
        array = tensor.float().numpy()
        if array.ndim == 2 and key.endswith(".weight") and array.shape[1] % 32 == 0:
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(key, gguf.quants.quantize(array, q8), raw_dtype=q8)
        else:
            writer.add_tensor(key, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def test_gguf_q8_0_stays_quantized_and_matches_sd3_on_the_same_file(tmp_path):
    # widths 64 and 256: every Linear but the 16-wide patch embedding quantizes
    sd3 = _sd3(qk_norm="rms_norm", dual_attention_layers=(1,))
    path = _write_gguf(sd3_to_original(sd3.state_dict(), prefix=""), tmp_path / "sd3-Q8_0.gguf")
    quantization = GGUFQuantizationConfig(compute_dtype=torch.float32)
    ours = MMDiTTransformer2DModel.from_single_file(path, quantization_config=quantization)
    linears = [m for name, m in ours.named_modules() if isinstance(m, torch.nn.Linear) and name != "x_embedder"]
    assert linears and all(isinstance(m, GGUFLinear) and m.weight.dtype == torch.uint8 for m in linears)
    reference = SD3Transformer2DModel.from_single_file(
        path, config=str(_saved(sd3, tmp_path)), quantization_config=quantization
    )  # diffusers' own GGUF path: the same dequantised weights in SD3's model
    expected = _outputs(reference, sd3.config)
    torch.testing.assert_close(_outputs(ours, sd3.config), expected, atol=1e-5, rtol=0)
    # and it is the checkpoint's model, to Q8_0's precision
    assert (expected - _outputs(sd3, sd3.config)).abs().max() < 0.02


@pytest.fixture(scope="module")
def single_file(tmp_path_factory):
    """A tiny SD3 pipeline, its diffusers folder (the `config`), and the same pipeline as one original file."""
    root = tmp_path_factory.mktemp("single-file")
    pipe = tiny_sd3_single_file_pipeline(seed=0)
    pipe.save_pretrained(root / "sd3")
    save_file(original_pipeline_checkpoint(pipe), root / "sd3_incl_clips_t5.safetensors")
    return pipe, str(root / "sd3"), str(root / "sd3_incl_clips_t5.safetensors")


def _images(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red circle left of a blue square", num_inference_steps=2, height=16, width=16, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def test_pipeline_from_single_file_matches_sd3(single_file):
    pipe, config, path = single_file
    reference = StableDiffusion3Pipeline.from_single_file(path, config=config)
    for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer"):  # the file is faithful
        original = getattr(pipe, name).state_dict()
        assert all(torch.equal(getattr(reference, name).state_dict()[k], v) for k, v in original.items()), name

    ours = MMDiTPipeline.from_single_file(path, config=config)
    assert isinstance(ours.transformer, MMDiTTransformer2DModel)
    np.testing.assert_allclose(_images(ours), _images(reference), atol=1e-4, rtol=0)
    # the transformer alone from the whole-pipeline file: only `model.diffusion_model.*` is read
    alone = MMDiTTransformer2DModel.from_single_file(path)
    assert all(torch.equal(alone.state_dict()[k], v) for k, v in ours.transformer.state_dict().items())


def test_pipeline_from_single_file_needs_config_for_sizes_diffusers_does_not_know(single_file):
    _, _, path = single_file
    with pytest.raises(InputError, match="Pass `config=`"):
        MMDiTPipeline.from_single_file(path)
