"""The attention of `MMDiTTransformer2DModel` is diffusers' own machinery: `Attention` modules with SD3's names and
processors, `set_attn_processor` / `attn_processors`, attention backends (`set_attention_backend`), processor
keyword arguments, and the model-level options of SD3's forward (`skip_layers`, `block_controlnet_hidden_states`),
each compared with `SD3Transformer2DModel` on the same random weights (float32, <= 1e-5). Also: our text padding
mask on every backend that takes masks, and checkpoints of the first layout loading unchanged."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.models.attention_dispatch import AttentionBackendName, attention_backend
from diffusers.models.attention_processor import (
    Attention,
    FusedJointAttnProcessor2_0,
    JointAttnProcessor2_0,
    PAGCFGJointAttnProcessor2_0,
    PAGJointAttnProcessor2_0,
    SD3IPAdapterJointAttnProcessor2_0,
)
from safetensors.torch import load_file, save_file

from mmdit_diffusers import MMDiTTransformer2DModel
from mmdit_diffusers.conversion.legacy import current_module_name_to_legacy, legacy_module_name_to_current
from mmdit_diffusers.errors import InputError
from mmdit_diffusers.models.attention import MASKED_BACKENDS, MMDiTAttention, MMDiTAttnProcessor

SD3_TINY = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=4,
                joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=20, out_channels=4,
                pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0, 1))
TOLERANCE = 1e-5


def make_pair(seed: int = 0, **overrides):
    """diffusers' SD3 with every weight from N(0, 0.1) (no zero gate), and ours converted from it."""
    torch.manual_seed(seed)
    sd3 = SD3Transformer2DModel(**{**SD3_TINY, **overrides})
    with torch.no_grad():
        for param in sd3.parameters():
            param.normal_(0, 0.1)
    return sd3.eval(), MMDiTTransformer2DModel.from_sd3(sd3).eval()


def make_inputs(batch: int = 2, txt_len: int = 9, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 4, 8, 12, generator=g),
        encoder_hidden_states=torch.randn(batch, txt_len, 24, generator=g),
        pooled_projections=torch.randn(batch, 20, generator=g),
        timestep=torch.rand(batch, generator=g) * 1000,
    )


def run(model, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**kwargs).sample


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = TOLERANCE):
    assert actual.shape == expected.shape
    assert expected.abs().max() > 0.1  # not a comparison of near-zero outputs
    assert (actual - expected).abs().max().item() <= tolerance


@pytest.fixture(autouse=True)
def native_backend_afterwards():
    """`set_attention_backend` also sets diffusers' process-wide active backend: restore the default."""
    yield
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)


# ----------------------------------------------------------------------------------------------------------
# Modules and processors
# ----------------------------------------------------------------------------------------------------------
def test_attention_modules_are_diffusers_attentions_with_sd3s_names_and_processors():
    sd3, ours = make_pair()
    assert ours.attn_processors.keys() == sd3.attn_processors.keys()
    assert "transformer_blocks.0.attn2.processor" in ours.attn_processors
    assert all(isinstance(p, MMDiTAttnProcessor) for p in ours.attn_processors.values())
    for block in ours.transformer_blocks:
        assert isinstance(block.attn, Attention) and not block.attn.is_cross_attention  # what PAG looks for
    attn, sd3_attn = ours.transformer_blocks[2].attn, sd3.transformer_blocks[2].attn
    assert attn.context_pre_only and attn.to_add_out is None and sd3_attn.to_add_out is None
    assert (attn.heads, attn.scale) == (sd3_attn.heads, sd3_attn.scale)
    ours_names = {n for n, _ in ours.named_parameters() if ".attn" in n}
    assert ours_names == {n for n, _ in sd3.named_parameters() if ".attn" in n}


@pytest.mark.parametrize("processor", [JointAttnProcessor2_0, PAGJointAttnProcessor2_0])
def test_diffusers_sd3_processors_give_sd3s_output(processor):
    sd3, ours = make_pair()
    if processor is PAGJointAttnProcessor2_0:  # PAG processors ignore QK-norm: SD3 (3.0) layout
        sd3, ours = make_pair(qk_norm=None, dual_attention_layers=())
    sd3.set_attn_processor(processor())
    ours.set_attn_processor(processor())
    assert all(type(p) is processor for p in ours.attn_processors.values())
    kwargs = make_inputs(batch=2)
    assert_close(run(ours, **kwargs), run(sd3, **kwargs))


def test_pag_cfg_processor_gives_sd3s_output():
    sd3, ours = make_pair(qk_norm=None, dual_attention_layers=())
    for model in (sd3, ours):
        model.set_attn_processor({name: PAGCFGJointAttnProcessor2_0() if name.startswith("transformer_blocks.1.")
                                  else JointAttnProcessor2_0() for name in model.attn_processors})
    kwargs = make_inputs(batch=3)  # (uncond, cond, perturbed), as the PAG pipelines batch it
    assert_close(run(ours, **kwargs), run(sd3, **kwargs))


def test_set_attn_processor_by_name_and_back_to_ours():
    _, ours = make_pair()
    kwargs = make_inputs()
    expected = run(ours, **kwargs)
    names = list(ours.attn_processors)
    ours.set_attn_processor({name: JointAttnProcessor2_0() for name in names})
    with pytest.raises(ValueError, match="number of processors"):
        ours.set_attn_processor({names[0]: MMDiTAttnProcessor()})
    ours.set_attn_processor(MMDiTAttnProcessor())
    assert torch.equal(run(ours, **kwargs), expected)


def test_set_default_attn_processor_puts_ours_back_everywhere():
    _, ours = make_pair()
    kwargs = make_inputs()
    expected = run(ours, **kwargs)
    ours.set_attn_processor(JointAttnProcessor2_0())
    ours.set_default_attn_processor()
    assert all(type(p) is MMDiTAttnProcessor for p in ours.attn_processors.values())
    assert torch.equal(run(ours, **kwargs), expected)


def test_fused_projections_run_diffusers_fused_processor_and_ours_alike():
    # SD3's fused processor skips QK-norm and has no self-attention path: the SD3 (3.0) layout
    sd3, ours = make_pair(qk_norm=None, dual_attention_layers=())
    kwargs = make_inputs()
    expected = run(sd3, **kwargs)
    sd3.fuse_qkv_projections()  # SD3's: fused layers beside the separate ones, FusedJointAttnProcessor2_0
    ours.fuse_qkv_projections()  # diffusers' AttentionMixin, through each module's fuse_projections()
    attn = ours.transformer_blocks[0].attn
    assert attn.fused_projections and not hasattr(attn, "to_q") and not hasattr(attn, "add_q_proj")
    assert_close(run(sd3, **kwargs), expected)
    assert_close(run(ours, **kwargs), expected)
    ours.set_attn_processor(FusedJointAttnProcessor2_0())
    assert_close(run(ours, **kwargs), expected)
    ours.set_attn_processor(MMDiTAttnProcessor())
    ours.unfuse_qkv_projections()
    assert not attn.fused_projections and hasattr(attn, "add_q_proj")
    assert_close(run(ours, **kwargs), expected)


def test_joint_attention_kwargs_reach_the_processors_as_in_sd3():
    """SD3.5's IP-Adapter processor (an nn.Module with weights) on the joint attentions, its inputs given as
    `joint_attention_kwargs`; "scale" is LoRA's and is not passed on."""
    sd3, ours = make_pair()
    torch.manual_seed(3)
    processors = {}
    for name in sd3.attn_processors:
        if ".attn." in name:
            processor = SD3IPAdapterJointAttnProcessor2_0(hidden_size=32, ip_hidden_states_dim=16, head_dim=8,
                                                          timesteps_emb_dim=12, scale=0.7)
            with torch.no_grad():
                for param in processor.parameters():
                    param.normal_(0, 0.3)
        else:
            processor = JointAttnProcessor2_0()
        processors[name] = processor
    sd3.set_attn_processor(dict(processors))
    ours.set_attn_processor(dict(processors))
    g = torch.Generator().manual_seed(4)
    ip = dict(ip_hidden_states=torch.randn(2, 5, 16, generator=g), temb=torch.randn(2, 12, generator=g))
    kwargs = make_inputs()
    expected = run(sd3, **kwargs, joint_attention_kwargs=dict(ip))
    assert (expected - run(sd3, **kwargs)).abs().max() > 1e-3  # the adapter changes the output
    assert_close(run(ours, **kwargs, joint_attention_kwargs=dict(ip)), expected)
    assert_close(run(ours, **kwargs, joint_attention_kwargs={**ip, "scale": 1.0}), expected)


def test_custom_processor_receives_the_keyword_arguments():
    _, ours = make_pair()
    seen = []

    class Recording(MMDiTAttnProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, my_option=None):
            seen.append(my_option)
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask)

    ours.set_attn_processor(Recording())
    run(ours, **make_inputs(), joint_attention_kwargs={"my_option": 7, "scale": 1.0})
    assert seen == [7] * len(ours.attn_processors)


# ----------------------------------------------------------------------------------------------------------
# Backends and the text padding mask
# ----------------------------------------------------------------------------------------------------------
def padding_mask(lengths, total):
    return torch.tensor([[1] * n + [0] * (total - n) for n in lengths])


def per_sample_reference(model, kwargs, lengths):
    """Each sample alone, its text cut to its real tokens: what the mask must reproduce."""
    rows = []
    for i, n in enumerate(lengths):
        alone = {k: v[i : i + 1] for k, v in kwargs.items()}
        alone["encoder_hidden_states"] = alone["encoder_hidden_states"][:, :n]
        rows.append(run(model, **alone))
    return torch.cat(rows)


def test_set_attention_backend_native_and_an_unknown_name_as_diffusers():
    sd3, ours = make_pair()
    kwargs = make_inputs()
    expected = run(ours, **kwargs)
    ours.set_attention_backend("native")
    assert all(p._attention_backend == AttentionBackendName.NATIVE for p in ours.attn_processors.values())
    assert torch.equal(run(ours, **kwargs), expected)
    with pytest.raises(ValueError) as ours_error:
        ours.set_attention_backend("no_such_backend")
    with pytest.raises(ValueError) as sd3_error:
        sd3.set_attention_backend("no_such_backend")
    assert str(ours_error.value) == str(sd3_error.value)


@pytest.mark.parametrize("backend", ["native", "_native_math", "flex"])
def test_the_text_padding_mask_works_with_backends_that_take_masks(backend):
    _, ours = make_pair()
    ours.set_attention_backend(backend)
    lengths = [3, 6]
    kwargs = make_inputs()
    expected = per_sample_reference(ours, kwargs, lengths)
    assert_close(run(ours, **kwargs, encoder_attention_mask=padding_mask(lengths, 9)), expected)


@pytest.mark.parametrize("backend", ["flash_varlen", "sage_varlen", "xformers"])
def test_masks_take_the_form_each_varlen_or_xformers_kernel_reads(backend):
    """Those kernels need GPUs and packages absent here; what they read is checked instead: xformers gets a
    [B, S] mask; the varlen kernels attend to `key[b, :count]`, so the kept keys come first, in order."""
    processor = MMDiTAttnProcessor()
    processor._attention_backend = AttentionBackendName(backend)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 11, 2, 4, generator=g) for _ in range(3))
    text_mask = torch.tensor([[1, 0, 1, 0, 0], [1, 1, 1, 1, 0]]).bool()  # padding inside the text, too
    key, value, mask = processor.key_mask(k, v, text_mask)
    full = torch.cat([text_mask, torch.ones(2, 6, dtype=torch.bool)], dim=1)
    reference = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=full[:, None, None, :]).transpose(1, 2)
    assert mask.shape == (2, 11)
    if backend == "xformers":
        assert torch.equal(mask, full) and key is k
        return
    counts = mask.sum(1)
    assert all(mask[b, : counts[b]].all() and not mask[b, counts[b] :].any() for b in range(2))
    for b in range(2):
        n = counts[b]
        out = torch.nn.functional.scaled_dot_product_attention(
            q[b : b + 1].transpose(1, 2), key[b : b + 1, :n].transpose(1, 2), value[b : b + 1, :n].transpose(1, 2))
        assert (out.transpose(1, 2) - reference[b : b + 1]).abs().max() <= 1e-6


@pytest.mark.parametrize("masked", [False, True])
def test_the_native_backend_is_diffusers_dispatch_bit_for_bit_and_its_checks_still_run(monkeypatch, masked):
    """Under the native backend the processor calls that backend's function itself (the dispatch's per-call work is
    ~1% of a small forward): the same output as `dispatch_attention_fn`, and with diffusers' checks on, the dispatch
    runs them."""
    from diffusers.models import attention_dispatch

    processor = MMDiTAttnProcessor()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 11, 2, 4, generator=g) for _ in range(3))
    mask = None
    if masked:
        k, v, mask = processor.key_mask(k, v, torch.tensor([[1, 0, 1, 0, 0], [1, 1, 1, 1, 0]]).bool())
    expected = attention_dispatch.dispatch_attention_fn(q, k, v, attn_mask=mask, backend=AttentionBackendName.NATIVE)
    assert torch.equal(processor.attend(q, k, v, mask), expected)

    calls = []
    def counting_dispatch(*args, **kwargs):
        calls.append(kwargs["backend"])
        return attention_dispatch.dispatch_attention_fn(*args, **kwargs)
    monkeypatch.setattr("mmdit_diffusers.models.attention.dispatch_attention_fn", counting_dispatch)
    processor.attend(q, k, v, mask)
    assert calls == []
    monkeypatch.setattr(attention_dispatch._AttentionBackendRegistry, "_checks_enabled", True)
    assert torch.equal(processor.attend(q, k, v, mask), expected)
    assert len(calls) == 1
    with pytest.raises(ValueError, match="same dtype"):  # one of diffusers' checks
        processor.attend(q, k.double(), v, mask)


def test_a_backend_without_masks_is_refused_only_when_a_mask_is_needed():
    _, ours = make_pair()
    kwargs = make_inputs()
    expected_unmasked = run(ours, **kwargs)
    ours.set_attention_backend("_native_flash")  # PyTorch's flash kernel: no masks (it runs on CPUs too)
    with pytest.raises(InputError, match=r"'_native_flash' takes no attention mask.*encoder_attention_mask"):
        run(ours, **kwargs, encoder_attention_mask=padding_mask([3, 6], 9))
    # padding shared by the whole batch is dropped before attention: no mask is needed
    shared = run(ours, **kwargs, encoder_attention_mask=padding_mask([9, 9], 9))
    assert_close(shared, expected_unmasked)
    assert "_native_flash" not in MASKED_BACKENDS and "native" in MASKED_BACKENDS


def test_the_attention_backend_context_manager_picks_the_kernel_too():
    _, ours = make_pair()
    with attention_backend("_native_flash"):
        with pytest.raises(InputError, match="_native_flash"):
            run(ours, **make_inputs(), encoder_attention_mask=padding_mask([3, 6], 9))


# ----------------------------------------------------------------------------------------------------------
# skip_layers and ControlNet residuals, as SD3's forward
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("skip_layers", [[1], [0, 2], [2]])
def test_skip_layers_as_sd3(skip_layers):
    sd3, ours = make_pair()
    kwargs = make_inputs()
    expected = run(sd3, **kwargs, skip_layers=skip_layers)
    assert (expected - run(sd3, **kwargs)).abs().max() > 1e-3
    assert_close(run(ours, **kwargs, skip_layers=skip_layers), expected)


def test_skip_layers_out_of_range_are_refused():
    _, ours = make_pair()
    with pytest.raises(InputError, match=r"`skip_layers` \[3\].*0\.\.2"):
        run(ours, **make_inputs(), skip_layers=[3])


@pytest.mark.parametrize("num_residuals", [1, 2, 3])
def test_block_controlnet_hidden_states_as_sd3(num_residuals):
    sd3, ours = make_pair()
    kwargs = make_inputs()
    g = torch.Generator().manual_seed(5)
    residuals = [torch.randn(2, 24, 32, generator=g) for _ in range(num_residuals)]  # 4 x 6 patches, hidden 32
    expected = run(sd3, **kwargs, block_controlnet_hidden_states=residuals)
    assert (expected - run(sd3, **kwargs)).abs().max() > 1e-3
    assert_close(run(ours, **kwargs, block_controlnet_hidden_states=residuals), expected)
    both = dict(block_controlnet_hidden_states=residuals, skip_layers=[1])
    assert_close(run(ours, **kwargs, **both), run(sd3, **kwargs, **both))


def test_an_empty_controlnet_residual_list_is_refused():
    _, ours = make_pair()
    with pytest.raises(InputError, match="block_controlnet_hidden_states"):
        run(ours, **make_inputs(), block_controlnet_hidden_states=[])


# ----------------------------------------------------------------------------------------------------------
# Checkpoints of the first layout (projections inside the streams) load with identical outputs
# ----------------------------------------------------------------------------------------------------------
def write_legacy_folder(model: MMDiTTransformer2DModel, path, shards: int = 1) -> dict:
    """The model saved as the first layout saved it: same config, tensors under the old names."""
    model.save_pretrained(path)
    state = load_file(path / "diffusion_pytorch_model.safetensors")
    legacy = {current_module_name_to_legacy(k): v for k, v in state.items()}
    assert any(".img.qkv.to_q." in k for k in legacy) and any(".txt.to_out." in k for k in legacy)
    assert any(".img.attn2.qkv.norm_q." in k for k in legacy)
    (path / "diffusion_pytorch_model.safetensors").unlink()
    if shards == 1:
        save_file(legacy, path / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
        return legacy
    keys = sorted(legacy)
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: legacy[k] for k in keys[i::shards]}
        save_file(part, path / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {}, "weight_map": weight_map}
    (path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return legacy


@pytest.mark.parametrize("low_cpu_mem_usage,shards", [(True, 1), (False, 1), (True, 3)])
def test_a_first_layout_checkpoint_loads_with_identical_outputs(tmp_path, low_cpu_mem_usage, shards):
    _, source = make_pair()
    write_legacy_folder(source, tmp_path, shards)
    loaded, info = MMDiTTransformer2DModel.from_pretrained(tmp_path, low_cpu_mem_usage=low_cpu_mem_usage,
                                                           output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    kwargs = make_inputs()
    mask = padding_mask([3, 6], 9)
    assert torch.equal(run(loaded.eval(), **kwargs, encoder_attention_mask=mask),
                       run(source, **kwargs, encoder_attention_mask=mask))


def test_load_state_dict_takes_first_layout_keys(tmp_path):
    _, source = make_pair()
    legacy = {current_module_name_to_legacy(k): v for k, v in source.state_dict().items()}
    target = MMDiTTransformer2DModel.from_config(source.config)
    target.load_state_dict(legacy, strict=True)
    kwargs = make_inputs()
    assert torch.equal(run(target.eval(), **kwargs), run(source, **kwargs))


def test_the_shipped_pipeline_transformer_is_first_layout_and_loads_every_tensor():
    from mmdit_diffusers.shapes.shipped import SHIPPED_PIPELINE

    folder = SHIPPED_PIPELINE / "transformer"
    stored = load_file(folder / "diffusion_pytorch_model.safetensors")
    model, info = MMDiTTransformer2DModel.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    state = model.state_dict()
    assert state.keys() == {legacy_module_name_to_current(k) for k in stored}
    assert all(torch.equal(state[legacy_module_name_to_current(k)], v) for k, v in stored.items())
    assert isinstance(model.transformer_blocks[0].attn, MMDiTAttention)
