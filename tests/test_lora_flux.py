"""diffusers-format FLUX.1 LoRA files on a FLUX-style `MMDiTTransformer2DModel` (converted from diffusers'
`FluxTransformer2DModel`): the same outputs as diffusers' FLUX transformer with the same file
(`load_lora_adapter`, which `FluxPipeline.load_lora_weights` calls), through our pipelines' LoRA conversion."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

from lora_fixtures import FLUX_TARGETS, peft_lora
from mmdit_diffusers import InputError, MMDiTTransformer2DModel
from mmdit_diffusers.pipelines.lora import MMDiTLoraLoaderMixin, convert_lora_state_dict
from tiny_pipeline import _seeded

FLUX_TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=20, guidance_embeds=True,
                 axes_dims_rope=(4, 6, 6))


def _flux(seed: int = 0) -> FluxTransformer2DModel:
    """Random weights from N(0, 0.2): diffusers' init leaves AdaLN biases at zero, which would hide mistakes."""
    with _seeded(seed):
        model = FluxTransformer2DModel(**FLUX_TINY)
        with torch.no_grad():
            for param in model.parameters():
                param.normal_(0, 0.2)
    return model.eval()


def _outputs(flux: FluxTransformer2DModel, ours: MMDiTTransformer2DModel):
    """(FLUX's, ours) on the same packed tokens and ids (batch 2, an 6 x 8 token grid), text, timestep, guidance."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(2, 48, FLUX_TINY["in_channels"], generator=g)
    common = dict(
        hidden_states=tokens,
        encoder_hidden_states=torch.randn(2, 7, FLUX_TINY["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(2, FLUX_TINY["pooled_projection_dim"], generator=g),
        guidance=torch.tensor([3.5, 1.5]),
        img_ids=FluxPipeline._prepare_latent_image_ids(2, 6, 8, "cpu", torch.float32),
        txt_ids=torch.zeros(7, 3),
    )
    sigma = torch.tensor([0.9, 0.3])
    with torch.no_grad():
        return flux(**common, timestep=sigma).sample, ours(**common, timestep=sigma * 1000).sample


def _random_flux_lora(flux: FluxTransformer2DModel, rank: int = 2) -> dict[str, torch.Tensor]:
    """A diffusers-format LoRA on every Linear of FLUX's transformer (its final norm's (scale, shift) halves, the
    guidance embedder and the single-stream blocks included); random, not small."""
    lora = {}
    with _seeded(2):
        for name, module in flux.named_modules():
            if isinstance(module, torch.nn.Linear):
                lora[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, module.in_features) * 0.3
                lora[f"transformer.{name}.lora_B.weight"] = torch.randn(module.out_features, rank) * 0.3
    return lora


def _load_ours(ours: MMDiTTransformer2DModel, source, **kwargs) -> None:
    """What `MMDiTPipeline.load_lora_weights` does for the transformer: read, convert, load."""
    state_dict, metadata = MMDiTLoraLoaderMixin.lora_state_dict(source, return_lora_metadata=True, **kwargs)
    state_dict, metadata = convert_lora_state_dict(state_dict, ours, metadata)
    MMDiTLoraLoaderMixin.load_lora_into_transformer(state_dict, transformer=ours, metadata=metadata)


def test_flux_lora_on_every_module_equals_flux():
    flux = _flux()
    ours = MMDiTTransformer2DModel.from_flux(flux)
    base, _ = _outputs(flux, ours)
    lora = _random_flux_lora(flux)
    flux.load_lora_adapter(dict(lora), prefix="transformer")
    _load_ours(ours, dict(lora))
    expected, actual = _outputs(flux, ours)
    assert (expected - base).abs().max() > 0.1
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_flux_lora_file_written_by_diffusers_equals_flux_on_the_same_file(tmp_path):
    layers, config = peft_lora(_flux(seed=3), FLUX_TARGETS, seed=4)
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=layers,
                                   transformer_lora_adapter_metadata=config)  # diffusers' own writer
    flux = _flux()
    ours = MMDiTTransformer2DModel.from_flux(flux)
    base, _ = _outputs(flux, ours)
    flux.load_lora_adapter(str(tmp_path), weight_name="pytorch_lora_weights.safetensors", prefix="transformer")
    _load_ours(ours, str(tmp_path))
    expected, actual = _outputs(flux, ours)
    assert (expected - base).abs().max() > 0.1
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_sd3_only_module_on_a_flux_style_model_is_refused():
    ours = MMDiTTransformer2DModel.from_flux(_flux())
    lora = {"transformer.transformer_blocks.0.attn2.to_q.lora_A.weight": torch.zeros(2, 32),
            "transformer.transformer_blocks.0.attn2.to_q.lora_B.weight": torch.zeros(32, 2),
            "transformer.transformer_blocks.0.ff.net.2.lora_A.weight": torch.zeros(2, 128),
            "transformer.transformer_blocks.0.ff.net.2.lora_B.weight": torch.zeros(32, 2)}
    with pytest.raises(InputError, match="FLUX module 'transformer_blocks.0.attn2.to_q'"):
        convert_lora_state_dict(lora, ours)
