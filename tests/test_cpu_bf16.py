"""`mmdit_diffusers.cpu_bf16`: `use_fp32_kernels_for_bf16(model)` makes a model's `nn.Linear` layers and attention
compute bfloat16 CPU tensors in float32, with bfloat16 inputs, outputs and gradients (for CPUs without bfloat16
instructions); everything else stays PyTorch's own ops.

The function is applied on any CPU here, and the results compared with a float64 reference, with PyTorch's own
bfloat16 kernel and with diffusers' SD3 in bfloat16."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel

from mmdit_diffusers import MMDiTTransformer2DModel
from mmdit_diffusers.cpu_bf16 import (
    BF16ViaFP32AttnProcessor,
    BF16ViaFP32Linear,
    cpu_has_bf16_instructions,
    use_fp32_kernels_for_bf16,
)
from mmdit_diffusers.models.attention import MMDiTAttention, MMDiTAttnProcessor

BF16_ULP = 2.0**-7  # spacing of bfloat16 numbers in [1, 2)


def scaled_dot_product_attention(q, k, v, attn_mask=None):
    """The processor's kernel (diffusers' attention dispatch, [B, S, heads, head_dim]) on [B, heads, S, head_dim]."""
    out = BF16ViaFP32AttnProcessor().attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask)
    return out.transpose(1, 2)


def fp32_kernel_linear(in_features: int, out_features: int) -> nn.Linear:
    return use_fp32_kernels_for_bf16(nn.Linear(in_features, out_features))


def bf16_layer_and_input(seed: int = 0, batch: tuple[int, ...] = (3, 5)):
    torch.manual_seed(seed)
    layer = fp32_kernel_linear(24, 40).to(torch.bfloat16)
    x = torch.randn(*batch, 24).to(torch.bfloat16).requires_grad_()
    return layer, x


def float64_reference(layer: nn.Linear, x: torch.Tensor, grad: torch.Tensor):
    """Output and gradients of y = x W^T + b computed in float64 from the same bfloat16 values."""
    x64 = x.detach().double().requires_grad_()
    w64 = layer.weight.detach().double().requires_grad_()
    b64 = layer.bias.detach().double().requires_grad_()
    y64 = F.linear(x64, w64, b64)
    y64.backward(grad.double())
    return y64, x64.grad, w64.grad, b64.grad


def assert_within_one_rounding(actual: torch.Tensor, exact: torch.Tensor):
    """`actual` (bfloat16) is the float64 value rounded to bfloat16, up to one unit in the last place."""
    assert actual.dtype == torch.bfloat16
    error = (actual.double() - exact).abs()
    assert (error <= BF16_ULP * exact.abs() + 1e-30).all(), error.max()


def test_opt_in_keeps_parameters_state_dict_and_linear_type():
    torch.manual_seed(0)
    model = MMDiTTransformer2DModel(img_dim=16, txt_dim=8, img_tokens=16, txt_tokens=8, hidden_size=32, depth=2,
                                    num_heads=2, dual_attention_layers=(0,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    assert {type(m) for m in model.modules() if isinstance(m, nn.Linear)} == {nn.Linear}  # plain until opted in
    assert all(type(m.processor) is MMDiTAttnProcessor for m in model.modules() if isinstance(m, MMDiTAttention))
    assert use_fp32_kernels_for_bf16(model) is model
    assert list(model.parameters()) == params
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    attentions = [m for m in model.modules() if isinstance(m, MMDiTAttention)]
    assert linears and all(type(m) is BF16ViaFP32Linear for m in linears)
    assert len(attentions) == 3  # two joint attentions, one dual-attention self-attention
    assert all(type(m.processor) is BF16ViaFP32AttnProcessor for m in attentions)
    model.fuse_qkv_projections()  # the fused projections keep the kernel
    assert type(model.transformer_blocks[0].attn.to_qkv) is BF16ViaFP32Linear
    assert type(model.transformer_blocks[0].attn.to_added_qkv) is BF16ViaFP32Linear
    assert isinstance(cpu_has_bf16_instructions(), bool)


def test_bf16_forward_and_gradients_are_the_exact_products_rounded_to_bf16():
    layer, x = bf16_layer_and_input()
    grad = torch.randn(3, 5, 40).to(torch.bfloat16)
    y = layer(x)
    y.backward(grad)
    y64, gx64, gw64, gb64 = float64_reference(layer, x, grad)
    assert_within_one_rounding(y, y64)
    assert_within_one_rounding(x.grad, gx64)
    assert_within_one_rounding(layer.weight.grad, gw64)
    assert_within_one_rounding(layer.bias.grad, gb64)


def test_bf16_path_agrees_with_pytorchs_bf16_kernel():
    fp32_kernel, x = bf16_layer_and_input()
    grad = torch.randn(3, 5, 40).to(torch.bfloat16)
    pytorch_kernel = nn.Linear(24, 40).to(torch.bfloat16)
    pytorch_kernel.load_state_dict(fp32_kernel.state_dict())
    results = []
    for layer in (fp32_kernel, pytorch_kernel):
        x.grad = None
        y = layer(x)
        y.backward(grad)
        results.append([t.clone() for t in (y, x.grad, layer.weight.grad, layer.bias.grad)])
    for ours, native in zip(*results):
        assert ours.dtype == native.dtype == torch.bfloat16
        torch.testing.assert_close(ours.float(), native.float(), rtol=4 * BF16_ULP, atol=1e-2)


def test_float32_and_float16_paths_are_plain_f_linear():
    torch.manual_seed(0)
    layer = fp32_kernel_linear(8, 6)
    x = torch.randn(4, 8)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    layer, xh = layer.to(torch.float16), x.to(torch.float16)
    assert torch.equal(layer(xh), F.linear(xh, layer.weight, layer.bias))


def test_under_autocast_the_inputs_are_rounded_to_bf16_and_parameter_gradients_stay_float32():
    torch.manual_seed(0)
    layer = fp32_kernel_linear(24, 40)
    x = torch.randn(6, 24, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        expected = F.linear(x, layer.weight, layer.bias)  # autocast's own bf16 linear
    assert y.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected.float(), rtol=4 * BF16_ULP, atol=1e-2)
    y.float().sum().backward()
    assert x.grad.dtype == layer.weight.grad.dtype == layer.bias.grad.dtype == torch.float32
    torch.testing.assert_close(layer.bias.grad, torch.full((40,), 6.0))


def test_gradients_reach_inputs_that_need_them_only():
    layer, x = bf16_layer_and_input()
    layer.requires_grad_(False)
    layer(x).float().sum().backward()
    assert x.grad is not None and layer.weight.grad is None and layer.bias.grad is None


def test_bf16_attention_and_its_gradients_are_the_exact_results_rounded_to_bf16():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 8).to(torch.bfloat16).requires_grad_() for _ in range(3))
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    mask[0, ..., -3:] = False  # padded keys of the first sample
    grad = torch.randn(2, 3, 9, 8).to(torch.bfloat16)
    out = scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out.backward(grad)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out64 = F.scaled_dot_product_attention(q64, k64, v64, attn_mask=mask)
    out64.backward(grad.double())
    for actual, exact in ((out, out64), (q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert actual.dtype == torch.bfloat16
        # float32 softmax and sums: within one bf16 rounding of the float64 result, up to float32 noise near zero
        assert ((actual.double() - exact).abs() <= BF16_ULP * exact.abs() + 1e-4).all()


def test_attention_under_autocast_is_bf16_and_in_float32_is_pytorchs():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 8).to(torch.bfloat16) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert scaled_dot_product_attention(q, k, v).dtype == torch.bfloat16
    q, k, v = q.float(), k.float(), v.float()
    assert torch.equal(scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


# A whole model in bfloat16: ours (fp32 kernel) against diffusers' SD3 (PyTorch's bf16 kernel), same weights.
SD3_TINY = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
                joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=20, out_channels=4,
                pos_embed_max_size=16, qk_norm="rms_norm")


def test_bf16_model_matches_diffusers_sd3_in_bf16_forward_and_backward():
    torch.manual_seed(0)
    sd3 = SD3Transformer2DModel(**SD3_TINY)
    with torch.no_grad():
        for param in sd3.parameters():
            param.normal_(0, 0.1)
    ours = use_fp32_kernels_for_bf16(MMDiTTransformer2DModel.from_sd3(sd3))
    sd3, ours = sd3.to(torch.bfloat16), ours.to(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    kwargs = dict(
        hidden_states=torch.randn(2, 4, 8, 8, generator=g).to(torch.bfloat16),
        encoder_hidden_states=torch.randn(2, 7, 24, generator=g).to(torch.bfloat16),
        pooled_projections=torch.randn(2, 20, generator=g).to(torch.bfloat16),
        timestep=torch.rand(2, generator=g) * 1000,
    )
    out_sd3, out_ours = sd3(**kwargs).sample, ours(**kwargs).sample
    assert out_ours.dtype == torch.bfloat16
    scale = out_sd3.float().abs().max()
    assert scale > 0.5
    assert (out_ours.float() - out_sd3.float()).abs().max() <= 0.03 * scale
    out_sd3.float().square().mean().backward()
    out_ours.float().square().mean().backward()
    grad_sd3 = sd3.transformer_blocks[0].ff.net[2].weight.grad.float()  # the first block's image MLP output
    grad_ours = ours.transformer_blocks[0].img.mlp.fc2.weight.grad.float()
    assert grad_ours.abs().max() > 0
    assert (grad_ours - grad_sd3).norm() <= 0.05 * grad_sd3.norm()


def test_bf16_model_compiles_without_graph_breaks_and_matches_eager():
    """Both paths (a custom autograd Function, autocast switched off around float32 attention) trace in one graph."""
    torch.manual_seed(0)
    model = MMDiTTransformer2DModel(img_dim=16, txt_dim=8, img_tokens=16, txt_tokens=8, hidden_size=32, depth=2,
                                    num_heads=2)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.2)
    model = use_fp32_kernels_for_bf16(model.to(torch.bfloat16))
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(2, 16, 16, generator=g).to(torch.bfloat16), torch.randn(2, 8, 8, generator=g).to(torch.bfloat16),
            torch.randn(2, 32, generator=g).to(torch.bfloat16), torch.rand(2, generator=g) * 1000)
    eager = model(*args).sample
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(*args).sample
    torch.testing.assert_close(compiled, eager)
    compiled.float().square().mean().backward()
    assert model.transformer_blocks[0].img.mlp.fc2.weight.grad.dtype == torch.bfloat16
