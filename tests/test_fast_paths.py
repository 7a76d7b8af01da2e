"""The CPU speed paths against the plain computation they replace: the fused ops of
`mmdit_diffusers.models.fused_ops` (oneDNN products, fused GELU, bfloat16 attention), alone and inside the model
(against the model with them off and against diffusers' SD3), in inference and, for the float32 products, in
training; switched on here on any CPU (`CPU_FUSED_KERNELS`) so that the tests run the same on CPUs with and
without bfloat16 units; and the pipeline's text padding, dropped before the blocks whenever the mask is on."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel

from mmdit_diffusers import MMDiTTransformer2DModel
from mmdit_diffusers.models import attention, fused_ops
from mmdit_diffusers.models.validation import warn_if_not_finite
from tiny_pipeline import tiny_mmdit_pipeline

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="the fused GELU needs oneDNN")


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread, as the fused attention needs (and the benchmarks use)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fused(monkeypatch):
    """The fused paths on, the attention's and the float32 products' down to the tests' small sizes."""
    monkeypatch.setattr(fused_ops, "CPU_FUSED_KERNELS", True)
    monkeypatch.setattr(fused_ops, "CPU_BF16_ATTENTION", True)
    monkeypatch.setattr(fused_ops, "CPU_BF16_TRAINING_ATTENTION", True)
    monkeypatch.setattr(fused_ops, "CPU_TRAINING_GELU", True)
    monkeypatch.setattr(fused_ops, "ONEDNN_FP32_MAX_NARROW_SIDE", math.inf)
    monkeypatch.setattr(fused_ops, "ONEDNN_FP32_INPUT_GRAD", True)
    monkeypatch.setattr(fused_ops, "MIN_LOGITS", 0)
    monkeypatch.setattr(fused_ops, "ONEDNN_FP32_MIN_MACS", 0)
    monkeypatch.setattr(fused_ops, "ADDCMUL_BACKWARD_MIN_ELEMENTS", 0)
    monkeypatch.setattr(fused_ops, "TRAINING_GELU_MIN_ELEMENTS", 0)


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls of the fused kernels: {"linear": n, "linear_gelu": n, "attention": n} (oneDNN products
    without and with the GELU, the bfloat16 attention)."""
    calls = {"linear": 0, "linear_gelu": 0, "attention": 0}
    linear_pointwise, bf16_attention = torch.ops.mkldnn._linear_pointwise, attention.cpu_bf16_attention

    def counted_linear_pointwise(*args):
        calls["linear_gelu" if args[3] == "gelu" else "linear"] += 1
        return linear_pointwise(*args)

    def counted_attention(*args):
        calls["attention"] += 1
        return bf16_attention(*args)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", counted_linear_pointwise)
    monkeypatch.setattr(attention, "cpu_bf16_attention", counted_attention)
    return calls


def max_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    return (actual.double() - reference.double()).abs().max().item()


def rms_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """Root-mean-square error: a model's bfloat16 error spread over its outputs (its max is one noisy element)."""
    return (actual.double() - reference.double()).square().mean().sqrt().item()


def linear_layer(dtype, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(64, 256)
    with torch.no_grad():
        layer.weight.normal_(0, 0.3)
        layer.bias.normal_(0, 0.3)
    return layer.to(dtype)


# ----------------------------------------------------------------------------------------------------------
# The ops alone
# ----------------------------------------------------------------------------------------------------------
def float64_reference(layer: nn.Linear, x: torch.Tensor, gelu: bool) -> torch.Tensor:
    out = F.linear(x.double(), layer.weight.double(), layer.bias.double())
    return F.gelu(out, approximate="tanh") if gelu else out


@pytest.mark.usefixtures("fused")
@pytest.mark.parametrize("gelu", [False, True], ids=["linear", "linear_gelu_tanh"])
def test_float32_products_are_as_accurate_as_the_plain_ops(gelu, spy):
    """float32 without gradients: oneDNN's product (and GELU) sums in another order than PyTorch's (MKL), so not
    bit for bit the plain ops, but as close to float64 and within float32 rounding of them."""
    layer, x = linear_layer(torch.float32), torch.randn(3, 20, 64) * 3
    with torch.no_grad():
        if gelu:
            actual, plain = fused_ops.linear_gelu_tanh(layer, x), F.gelu(layer(x), approximate="tanh")
        else:
            actual, plain = fused_ops.linear(layer, x), layer(x)
    exact = float64_reference(layer, x, gelu)
    assert spy == {"linear": int(not gelu), "linear_gelu": int(gelu), "attention": 0} and actual.dtype == torch.float32
    assert max_error(actual, exact) <= 2 * max_error(plain, exact) + 1e-6
    assert max_error(actual, plain) <= 1e-5 * exact.abs().max().item()


@pytest.mark.usefixtures("fused")
def test_bfloat16_linear_is_no_less_accurate_than_the_plain_op(spy):
    layer, x = linear_layer(torch.bfloat16), torch.randn(3, 20, 64).bfloat16()
    with torch.no_grad():
        actual, plain = fused_ops.linear(layer, x[:, 5:]), layer(x[:, 5:])  # a strided input too
    exact = float64_reference(layer, x[:, 5:], gelu=False)
    assert spy["linear"] == 1 and actual.dtype == torch.bfloat16 and actual.shape == plain.shape
    assert max_error(actual, exact) <= max_error(plain, exact)


@pytest.mark.usefixtures("fused")
@pytest.mark.parametrize("gelu", [False, True], ids=["linear", "linear_gelu_tanh"])
def test_float32_training_gradients_are_the_plain_ones(gelu, spy):
    """With gradients, float32: oneDNN's product forward and for the input's gradient (`_OneDNNLinear`), the GELU
    as PyTorch's; every gradient as the plain ops' within float32 rounding, and none asked for a frozen weight."""
    layer, x = linear_layer(torch.float32), (torch.randn(3, 20, 64) * 3).requires_grad_()
    fn = fused_ops.linear_gelu_tanh if gelu else fused_ops.linear
    plain_fn = (lambda l, x: F.gelu(l(x), approximate="tanh")) if gelu else (lambda l, x: l(x))
    out, plain = fn(layer, x), plain_fn(layer, x)
    grad = torch.randn_like(out)
    params = (x, layer.weight, layer.bias)
    actual, expected = torch.autograd.grad(out, params, grad), torch.autograd.grad(plain, params, grad)
    assert spy == {"linear": 2, "linear_gelu": 0, "attention": 0}  # the forward product and the input's gradient
    assert max_error(out, plain) <= 1e-5 * plain.abs().max().item()
    for a, e in zip(actual, expected):
        assert a.shape == e.shape and max_error(a, e) <= 1e-5 * e.abs().max().item()
    layer.requires_grad_(False)
    (grad_x,) = torch.autograd.grad(fn(layer, x), x, grad)
    assert layer.weight.grad is None and max_error(grad_x, expected[0]) <= 1e-5 * expected[0].abs().max().item()


@pytest.mark.usefixtures("fused")
def test_linear_gelu_tanh_bfloat16_is_no_less_accurate_than_the_plain_ops(spy):
    layer, x = linear_layer(torch.bfloat16), torch.randn(3, 20, 64).bfloat16()
    with torch.no_grad():
        actual, plain = fused_ops.linear_gelu_tanh(layer, x), F.gelu(layer(x), approximate="tanh")
        exact = F.gelu(F.linear(x.double(), layer.weight.double(), layer.bias.double()), approximate="tanh")
    assert spy["linear_gelu"] == 1 and actual.dtype == torch.bfloat16
    assert max_error(actual, exact) <= max_error(plain, exact)  # one rounding instead of two


@pytest.mark.usefixtures("fused")
def test_linear_gelu_tanh_under_autocast_casts_as_autocast_does(spy):
    layer, x = linear_layer(torch.float32), torch.randn(3, 20, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        actual, plain = fused_ops.linear_gelu_tanh(layer, x), F.gelu(layer(x), approximate="tanh")
    with torch.no_grad():  # what autocast computes: the operands rounded to bfloat16
        bf16 = layer.to(torch.bfloat16)
        exact = F.gelu(F.linear(x.bfloat16().double(), bf16.weight.double(), bf16.bias.double()), approximate="tanh")
    assert spy["linear_gelu"] == 1 and actual.dtype == plain.dtype == torch.bfloat16
    assert max_error(actual, exact) <= max_error(plain, exact)


class MarkedTensor(torch.Tensor):
    """A tensor subclass that marks what it computes (the results of its ops are `MarkedTensor`s)."""


@pytest.mark.usefixtures("fused")
def test_the_products_keep_the_plain_path_for_bfloat16_gradients_float16_autocast_subclasses_and_hooks(spy):
    layer, x = linear_layer(torch.bfloat16), torch.randn(3, 20, 64).bfloat16()
    out = fused_ops.linear_gelu_tanh(layer, x)  # the weight requires grad: bfloat16 training is PyTorch's product
    assert out.requires_grad and torch.equal(out, fused_ops.gelu_tanh(layer(x)))
    layer = linear_layer(torch.float32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        assert torch.equal(fused_ops.linear(layer, x.float()), layer(x.float()))
    with torch.no_grad():  # a tensor subclass for a weight (as torchao's quantized ones) has its own F.linear
        layer.weight = nn.Parameter(torch.Tensor._make_subclass(MarkedTensor, layer.weight.detach()))
        assert isinstance(fused_ops.linear(layer, x.float()), MarkedTensor)
        layer.weight = nn.Parameter(layer.weight.detach().as_subclass(torch.Tensor))
    layer.register_forward_hook(lambda module, args, output: output * 2)
    with torch.no_grad():
        hooked = fused_ops.linear_gelu_tanh(layer, x.float())
        assert torch.equal(fused_ops.linear(layer, x.float()), layer(x.float()))  # the hook ran
    assert torch.equal(hooked, F.gelu(layer(x.float()), approximate="tanh"))
    assert spy == {"linear": 0, "linear_gelu": 0, "attention": 0}


@pytest.mark.usefixtures("fused")
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # inside torch.func
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_mode_derivatives_and_torch_func_take_the_plain_path(dtype, spy):
    """oneDNN's ops have no forward derivative (they would drop a tangent silently): `torch.func.jvp`, dual
    tensors and `torch.func.vmap` get PyTorch's ops and their derivatives."""
    layer, x = linear_layer(dtype), torch.randn(3, 20, 64).to(dtype)
    tangent = torch.randn_like(x)
    for fn, plain in ((fused_ops.linear, lambda x: layer(x)),
                      (lambda l, x: fused_ops.linear_gelu_tanh(l, x), lambda x: F.gelu(layer(x), approximate="tanh"))):
        with torch.no_grad():
            out, out_tangent = torch.func.jvp(lambda x: fn(layer, x), (x,), (tangent,))
            expected = torch.func.jvp(plain, (x,), (tangent,))
            assert torch.equal(out, expected[0]) and torch.equal(out_tangent, expected[1])
            with forward_ad.dual_level():
                dual = fn(layer, forward_ad.make_dual(x, tangent))
                assert torch.equal(forward_ad.unpack_dual(dual).tangent, expected[1])
            assert torch.equal(torch.func.vmap(lambda x: fn(layer, x))(x), torch.func.vmap(plain)(x))
    assert spy == {"linear": 0, "linear_gelu": 0, "attention": 0}


@pytest.mark.usefixtures("fused")
def test_small_float32_products_keep_the_plain_path(monkeypatch, spy):
    """Below `ONEDNN_FP32_MIN_MACS` multiply-adds, float32 products are PyTorch's (faster there), bit for bit, with
    and without gradients; bfloat16 ones take oneDNN at any size."""
    layer, x = linear_layer(torch.float32), torch.randn(3, 20, 64)
    monkeypatch.setattr(fused_ops, "ONEDNN_FP32_MIN_MACS", x.numel() * 256 + 1)
    with torch.no_grad():
        assert torch.equal(fused_ops.linear_gelu_tanh(layer, x), F.gelu(layer(x), approximate="tanh"))
        assert torch.equal(fused_ops.linear(layer, x), layer(x))
    assert torch.equal(fused_ops.linear(layer, x), layer(x))
    assert spy == {"linear": 0, "linear_gelu": 0, "attention": 0}
    monkeypatch.setattr(fused_ops, "ONEDNN_FP32_MIN_MACS", x.numel() * 256)
    with torch.no_grad():
        fused_ops.linear(layer, x), fused_ops.linear(layer.bfloat16(), x.bfloat16())
    assert spy["linear"] == 2


@pytest.mark.usefixtures("fused")
def test_intel_cpus_keep_mkl_for_large_float32_products_and_input_gradients(monkeypatch, spy):
    """Intel CPUs (`ONEDNN_FP32_MAX_NARROW_SIDE` finite, `ONEDNN_FP32_INPUT_GRAD` false): float32 products of layers
    wider than the limit on both sides are PyTorch's, bit for bit, with and without gradients, but fc1 + GELU
    inference stays fused and bfloat16 takes oneDNN; for a narrower layer the training forward is oneDNN's and the
    input gradient PyTorch's, bit for bit."""
    layer, x = linear_layer(torch.float32), torch.randn(3, 20, 64)
    monkeypatch.setattr(fused_ops, "ONEDNN_FP32_MAX_NARROW_SIDE", 63)  # the layer: 64 in, 256 out
    monkeypatch.setattr(fused_ops, "ONEDNN_FP32_INPUT_GRAD", False)
    with torch.no_grad():
        assert torch.equal(fused_ops.linear(layer, x), layer(x))
        assert spy == {"linear": 0, "linear_gelu": 0, "attention": 0}
        fused_gelu = fused_ops.linear_gelu_tanh(layer, x)
        assert spy["linear_gelu"] == 1
        assert max_error(fused_gelu, F.gelu(layer(x), approximate="tanh")) <= 1e-5
        fused_ops.linear(linear_layer(torch.bfloat16), x.bfloat16())
        assert spy["linear"] == 1
    for out, plain in ((fused_ops.linear(layer, x), layer(x)),  # the product PyTorch's, then the training GELU
                       (fused_ops.linear_gelu_tanh(layer, x), fused_ops.gelu_tanh(layer(x)))):
        assert torch.equal(out, plain) and out.grad_fn.name() == plain.grad_fn.name()
    assert spy == {"linear": 1, "linear_gelu": 1, "attention": 0}
    monkeypatch.setattr(fused_ops, "ONEDNN_FP32_MAX_NARROW_SIDE", 64)
    grad = torch.randn(3, 20, 256)
    x_fused, x_plain = x.clone().requires_grad_(), x.clone().requires_grad_()
    fused_ops.linear(layer, x_fused).backward(grad)
    assert spy["linear"] == 2  # the forward only
    layer(x_plain).backward(grad)
    assert torch.equal(x_fused.grad, x_plain.grad)


@pytest.mark.parametrize("capability, bf16, amx, expected", [
    ("AVX512", True, True, (True, True)), ("AVX512", True, False, (True, False)),
    ("AVX512", False, False, (False, False)), ("AVX2", True, True, (False, False)), ("DEFAULT", True, True, (False, False))],
    ids=["amx", "avx512-bf16", "avx512", "held-to-avx2", "held-to-default"])
def test_bf16_instructions_count_where_pytorchs_kernels_may_use_them(capability, bf16, amx, expected, monkeypatch):
    """A CPU's AVX512-BF16 / AMX count unless the process holds PyTorch to lower kernels (`ATEN_CPU_CAPABILITY`):
    then it runs as on an AVX2-only CPU, the fused paths off and bfloat16 on `cpu_bf16`'s float32 kernels."""
    from mmdit_diffusers.cpu_bf16 import cpu_has_bf16_instructions

    monkeypatch.setattr(torch.cpu, "_is_avx2_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert (fused_ops.x86_bf16_instructions(), fused_ops.x86_amx()) == expected
    assert cpu_has_bf16_instructions() == expected[0]
    monkeypatch.setattr(torch.cpu, "_is_avx2_supported", lambda: False)  # not x86 with AVX2: cannot tell
    assert fused_ops.x86_bf16_instructions() is None and not fused_ops.x86_amx() and cpu_has_bf16_instructions()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_products_are_plain_where_the_fused_kernels_are_off(dtype, monkeypatch, spy):
    """An AVX2-only CPU (or any without bfloat16 units): PyTorch's ops, bit for bit, with and without gradients."""
    monkeypatch.setattr(fused_ops, "CPU_FUSED_KERNELS", False)
    layer, x = linear_layer(dtype), torch.randn(3, 20, 64).to(dtype)
    with torch.no_grad():
        assert torch.equal(fused_ops.linear_gelu_tanh(layer, x), F.gelu(layer(x), approximate="tanh"))
        assert torch.equal(fused_ops.linear(layer, x), layer(x))
    assert fused_ops.linear(layer, x).grad_fn.name() == layer(x).grad_fn.name()
    assert spy == {"linear": 0, "linear_gelu": 0, "attention": 0}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_modulate_and_add_gated(dtype):
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(2, 40, 32, generator=g).to(dtype) for _ in range(2))
    scale, shift, gate = (torch.randn(2, 1, 32, generator=g).to(dtype) for _ in range(3))
    modulated, residual = fused_ops.modulate(x, scale, shift), fused_ops.add_gated(x, gate, y)
    plain_modulated, plain_residual = x * (1 + scale) + shift, x + gate * y
    if dtype == torch.float32:  # SD3's two ops, bit for bit
        assert torch.equal(modulated, plain_modulated) and torch.equal(residual, plain_residual)
        return
    xd, yd, scale_d, shift_d, gate_d = (t.double() for t in (x, y, scale, shift, gate))
    exact_modulated, exact_residual = xd * (1 + scale_d) + shift_d, xd + gate_d * yd
    # one rounding: within half a unit in the last place of the exact result (where 1 + scale is exact), never
    # worse than the two roundings of the plain ops
    assert max_error(modulated, exact_modulated) <= max_error(plain_modulated, exact_modulated)
    assert max_error(residual, exact_residual) <= max_error(plain_residual, exact_residual)
    assert modulated.dtype == residual.dtype == dtype


@pytest.mark.usefixtures("fused")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_modulate_and_add_gated_train_with_autograds_gradients_bit_for_bit(dtype, monkeypatch):
    """In training `_Addcmul` skips autograd's pass that multiplies by `value`: the same output and the same
    gradients for every operand, broadcast ones (the [B, 1, D] AdaLN vectors) summed as autograd sums them."""
    calls = []
    run = fused_ops._Addcmul.apply
    monkeypatch.setattr(fused_ops._Addcmul, "apply", lambda *args: calls.append(1) or run(*args))
    g = torch.Generator().manual_seed(0)
    x, y, grad = (torch.randn(2, 40, 32, generator=g).to(dtype) for _ in range(3))
    scale, shift, gate = (torch.randn(2, 1, 32, generator=g).to(dtype) for _ in range(3))

    def outputs_and_gradients(modulate, add_gated):
        leaves = [t.clone().requires_grad_() for t in (x, y, scale, shift, gate)]
        lx, ly, lscale, lshift, lgate = leaves
        out = add_gated(modulate(lx, lscale, lshift), lgate, ly)
        out.backward(grad)
        return [out.detach(), *(t.grad for t in leaves)]

    fused = outputs_and_gradients(fused_ops.modulate, fused_ops.add_gated)
    assert len(calls) == 2
    plain = outputs_and_gradients(lambda x, s, b: torch.addcmul(b, x, 1 + s), lambda x, gt, y: torch.addcmul(x, gt, y))
    assert all(torch.equal(a, b) for a, b in zip(fused, plain))
    with torch.no_grad():  # inference, tensors below the size where it pays, and a CPU without the fused paths
        fused_ops.modulate(x, scale, shift)  # keep PyTorch's addcmul
    monkeypatch.setattr(fused_ops, "ADDCMUL_BACKWARD_MIN_ELEMENTS", x.numel() + 1)
    outputs_and_gradients(fused_ops.modulate, fused_ops.add_gated)
    monkeypatch.setattr(fused_ops, "ADDCMUL_BACKWARD_MIN_ELEMENTS", 0)
    monkeypatch.setattr(fused_ops, "CPU_FUSED_KERNELS", False)
    outputs_and_gradients(fused_ops.modulate, fused_ops.add_gated)
    assert len(calls) == 2


def attention_inputs(batch=3, seq=40, kv=52, heads=4, head_dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq, heads, head_dim, generator=g) * 2  # logits of a few units: a peaked softmax
    k = torch.randn(batch, kv, heads, head_dim, generator=g) * 2
    v = torch.randn(batch, kv, heads, head_dim, generator=g)
    mask = torch.rand(batch, kv, generator=g) > 0.3
    mask[:, -10:] = True  # image keys are always attended to
    return q.bfloat16(), k.bfloat16(), v.bfloat16(), mask[:, None, None, :]


def sdpa(q, k, v, mask):
    """PyTorch's SDPA on [B, S, heads, head_dim] tensors (diffusers' native backend)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


@pytest.mark.parametrize("masked", [False, True])
def test_cpu_bf16_attention_is_as_accurate_as_the_flash_kernel(masked):
    q, k, v, mask = attention_inputs()
    mask = mask if masked else None
    actual, flash = fused_ops.cpu_bf16_attention(q, k, v, mask), sdpa(q, k, v, mask)
    exact = sdpa(q.double(), k.double(), v.double(), mask)
    assert actual.shape == q.shape and actual.dtype == torch.bfloat16
    assert max_error(actual, exact) <= 2 * max_error(flash, exact) + 1e-3
    assert (actual.double() - exact).abs().mean() <= 1.5 * (flash.double() - exact).abs().mean()


def test_cpu_bf16_attention_ignores_masked_keys():
    q, k, v, mask = attention_inputs()
    k2, v2 = k.clone(), v.clone()
    k2[~mask[:, 0, 0]], v2[~mask[:, 0, 0]] = 100.0, -100.0
    assert torch.equal(fused_ops.cpu_bf16_attention(q, k, v, mask), fused_ops.cpu_bf16_attention(q, k2, v2, mask))


@pytest.mark.usefixtures("fused")
def test_cpu_bf16_attention_applies_to_bfloat16_inference_within_its_size_limits(monkeypatch):
    q, k, v, _ = attention_inputs()
    logits = 40 * 4 * 52  # per sample: queries x heads x keys
    with torch.no_grad():
        assert fused_ops.cpu_bf16_attention_applies(q, k, v)
        assert not fused_ops.cpu_bf16_attention_applies(q.float(), k.float(), v.float())
        monkeypatch.setattr(fused_ops, "MAX_LOGITS_BYTES", 4 * logits - 4)
        assert not fused_ops.cpu_bf16_attention_applies(q, k, v)
        monkeypatch.setattr(fused_ops, "MAX_LOGITS_BYTES", 4 * logits)
        monkeypatch.setattr(fused_ops, "MIN_LOGITS", logits + 1)
        assert not fused_ops.cpu_bf16_attention_applies(q, k, v)
        monkeypatch.setattr(fused_ops, "MIN_LOGITS", logits)
        assert fused_ops.cpu_bf16_attention_applies(q, k, v)
        monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # measured faster on one thread only
        assert not fused_ops.cpu_bf16_attention_applies(q, k, v)
        monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
        monkeypatch.setattr(fused_ops, "CPU_BF16_ATTENTION", False)  # a CPU with AMX: the flash kernel is faster
        assert not fused_ops.cpu_bf16_attention_applies(q, k, v)
    monkeypatch.undo()
    monkeypatch.setattr(fused_ops, "CPU_FUSED_KERNELS", True)
    monkeypatch.setattr(fused_ops, "CPU_BF16_ATTENTION", True)
    monkeypatch.setattr(fused_ops, "MIN_LOGITS", 0)
    assert not fused_ops.cpu_bf16_attention_applies(q.requires_grad_(), k, v)


def gradients_of(attend, q, k, v, grad_out):
    """(output, [dq, dk, dv]) of `attend` on [B, S, heads, head_dim] tensors."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = attend(q, k, v)
    out.backward(grad_out.to(out.dtype))
    return out, [t.grad for t in (q, k, v)]


@pytest.mark.parametrize("spread", [2.0, 1.0, 0.5], ids=["peaked", "middling", "flat"])
@pytest.mark.parametrize("keys", [40, 52])
def test_cpu_bf16_training_attention_is_the_flash_forward_with_gradients_as_accurate(spread, keys):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 4, 32, generator=g).mul(spread).bfloat16() for n in (40, keys, keys))
    grad_out = torch.randn(2, 40, 4, 32, generator=g).bfloat16()
    out, grads = gradients_of(fused_ops.cpu_bf16_training_attention, q, k, v, grad_out)
    flash_out, flash_grads = gradients_of(lambda *t: sdpa(*t, None), q, k, v, grad_out)
    _, exact = gradients_of(lambda *t: sdpa(*t, None), q.double(), k.double(), v.double(), grad_out)
    assert torch.equal(out, flash_out)
    assert [(t.dtype, t.shape) for t in grads] == [(t.dtype, t.shape) for t in (q, k, v)]
    errors = [rms_error(a, e) / rms_error(f, e) for a, f, e in zip(grads, flash_grads, exact)]
    # dV is P^T dO, so it shows the probabilities (within 1.25x only with their low part); dQ, dK carry the
    # rounded dS (up to 1.8x the flash kernel's error measured, three roundings against its one)
    assert errors[0] <= 2.5 and errors[1] <= 2.5 and errors[2] <= 1.25, errors


@pytest.mark.usefixtures("fused")
def test_cpu_bf16_training_attention_applies_to_bfloat16_training_without_a_mask(monkeypatch):
    q, k, v, mask = attention_inputs()
    q.requires_grad_()
    assert fused_ops.cpu_bf16_training_attention_applies(q, k, v, None)
    assert not fused_ops.cpu_bf16_training_attention_applies(q, k, v, mask)
    assert not fused_ops.cpu_bf16_training_attention_applies(q.detach(), k, v, None)  # inference
    with torch.no_grad():
        assert not fused_ops.cpu_bf16_training_attention_applies(q, k, v, None)
    assert not fused_ops.cpu_bf16_training_attention_applies(q.float(), k.float(), v.float(), None)
    monkeypatch.setattr(fused_ops, "CPU_BF16_TRAINING_ATTENTION", False)  # a CPU without AMX
    assert not fused_ops.cpu_bf16_training_attention_applies(q, k, v, None)


def gelu_gradients(gelu, x, grad_out):
    x = x.detach().clone().requires_grad_()
    out = gelu(x)
    out.backward(grad_out.to(out.dtype))
    return out, x.grad


@pytest.mark.usefixtures("fused")
@pytest.mark.parametrize("shape, chunk", [((4, 77, 96), 4096), ((3, 50, 70), 1000), ((2, 5, 7), 65536)],
                         ids=["chunks", "remainder", "one-part"])
def test_gelu_tanh_for_bfloat16_training_is_the_plain_gelu_with_a_gradient_as_accurate(shape, chunk, monkeypatch):
    monkeypatch.setattr(fused_ops, "GELU_CHUNK", chunk)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g).mul(2.0).bfloat16()
    grad_out = torch.randn(*shape, generator=g).bfloat16()
    out, grad = gelu_gradients(fused_ops.gelu_tanh, x, grad_out)
    plain_out, plain_grad = gelu_gradients(lambda t: F.gelu(t, approximate="tanh"), x, grad_out)
    _, exact = gelu_gradients(lambda t: F.gelu(t, approximate="tanh"), x.double(), grad_out)
    assert out.dtype == grad.dtype == torch.bfloat16 and grad.shape == x.shape
    # the same bfloat16 output but where the two float32 evaluations round apart (one bfloat16 step), and below
    # x ~ -4.2, where PyTorch's float32 tanh reaches -1 and its GELU 0 while x * sigmoid(2u) keeps the GELU's tiny
    # negative values (|y| < 2e-7; at x = -5 the exact GELU is ~-1.2e-7)
    differs = (out.float() - plain_out.float()).abs() > 2e-7
    assert differs.float().mean() <= 2e-3
    assert ((out.float() - plain_out.float()).abs() <= plain_out.float().abs() * 2**-7 + 2e-7).all()
    # the derivative is rounded to bfloat16 before the product: ~1.55x the plain backward's error measured
    ratio = rms_error(grad, exact) / rms_error(plain_grad, exact)
    assert ratio <= 1.75, ratio
    # a non-contiguous input and autocast change nothing
    x_t = x.transpose(0, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_t, grad_t = gelu_gradients(fused_ops.gelu_tanh, x_t, grad_out.transpose(0, 1))
    assert torch.equal(out_t, out.transpose(0, 1)) and torch.equal(grad_t, grad.transpose(0, 1))


@pytest.mark.usefixtures("fused")
@pytest.mark.parametrize("shape, chunk", [((4, 77, 96), 4096), ((3, 50, 70), 1000), ((2, 5, 7), 65536)],
                         ids=["chunks", "remainder", "one-part"])
def test_gelu_tanh_for_float32_training_is_the_plain_gelu_as_accurate(shape, chunk, monkeypatch):
    """float32: no widening, the derivative kept in float32. The output within float32 rounding of PyTorch's (RMS
    error against float64 1.0-1.25x PyTorch's); the input gradient within a few float32 steps (p + q (1 - p) as
    p nears 1, x > ~3, keeps ~1e-6 of q: RMS error 1.2-2.3x PyTorch's, ~1e-7 relative)."""
    monkeypatch.setattr(fused_ops, "GELU_CHUNK", chunk)
    calls = []
    monkeypatch.setattr(fused_ops._TanhGELU, "apply", lambda x, run=fused_ops._TanhGELU.apply: calls.append(1) or run(x))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g).mul(3.0)
    grad_out = torch.randn(*shape, generator=g)
    out, grad = gelu_gradients(fused_ops.gelu_tanh, x, grad_out)
    assert calls == [1] and out.dtype == grad.dtype == torch.float32 and grad.shape == x.shape
    plain_out, plain_grad = gelu_gradients(lambda t: F.gelu(t, approximate="tanh"), x, grad_out)
    exact_out, exact_grad = gelu_gradients(lambda t: F.gelu(t, approximate="tanh"), x.double(), grad_out.double())
    assert max_error(out, plain_out) <= 1e-6 * plain_out.abs().max().item()
    assert max_error(grad, plain_grad) <= 5e-6 * plain_grad.abs().max().item()
    assert rms_error(out, exact_out) <= 1.5 * rms_error(plain_out, exact_out)
    assert rms_error(grad, exact_grad) <= 3 * rms_error(plain_grad, exact_grad)
    # a non-contiguous input: the same values but for a vector kernel's scalar tail falling elsewhere
    out_t, grad_t = gelu_gradients(fused_ops.gelu_tanh, x.transpose(0, 1), grad_out.transpose(0, 1))
    assert max_error(out_t, out.transpose(0, 1)) <= 1e-6 * out.abs().max().item()
    assert max_error(grad_t, grad.transpose(0, 1)) <= 5e-6 * grad.abs().max().item()


@pytest.mark.usefixtures("fused")
def test_gelu_tanh_applies_to_bfloat16_and_float32_training_on_one_thread_only(monkeypatch):
    calls = []
    monkeypatch.setattr(fused_ops._TanhGELU, "apply", lambda x, run=fused_ops._TanhGELU.apply: calls.append(1) or run(x))
    x = torch.randn(4, 64).bfloat16()

    def plain_everywhere(t):
        assert torch.equal(fused_ops.gelu_tanh(t), F.gelu(t, approximate="tanh"))

    plain_everywhere(x)  # no gradient to record
    plain_everywhere(x.float())
    plain_everywhere(x.half().requires_grad_())
    plain_everywhere(x.double().requires_grad_())
    torch.set_num_threads(2)
    plain_everywhere(x.clone().requires_grad_())  # two threads: PyTorch's kernel splits the work
    plain_everywhere(x.float().requires_grad_())
    torch.set_num_threads(1)
    monkeypatch.setattr(fused_ops, "TRAINING_GELU_MIN_ELEMENTS", x.numel() + 1)  # below the size where it pays
    plain_everywhere(x.clone().requires_grad_())
    plain_everywhere(x.float().requires_grad_())
    monkeypatch.setattr(fused_ops, "TRAINING_GELU_MIN_ELEMENTS", x.numel())
    monkeypatch.setattr(fused_ops, "CPU_TRAINING_GELU", False)  # a CPU without AMX
    plain_everywhere(x.clone().requires_grad_())
    plain_everywhere(x.float().requires_grad_())
    assert not calls
    monkeypatch.setattr(fused_ops, "CPU_TRAINING_GELU", True)
    fused_ops.gelu_tanh(x.clone().requires_grad_())
    fused_ops.gelu_tanh(x.float().requires_grad_())
    assert calls == [1, 1]


# ----------------------------------------------------------------------------------------------------------
# Inside the model
# ----------------------------------------------------------------------------------------------------------
SD3_TINY = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
                joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=20, out_channels=4,
                pos_embed_max_size=8, qk_norm="rms_norm")


def sd3_and_ours():
    torch.manual_seed(0)
    sd3 = SD3Transformer2DModel(**SD3_TINY)
    with torch.no_grad():
        for param in sd3.parameters():
            param.normal_(0, 0.2)
    return sd3.eval(), MMDiTTransformer2DModel.from_sd3(sd3).eval()


def model_inputs(dtype, batch=2, txt_len=11):
    g = torch.Generator().manual_seed(1)
    return dict(
        hidden_states=torch.randn(batch, 4, 12, 16, generator=g).to(dtype),
        encoder_hidden_states=torch.randn(batch, txt_len, 24, generator=g).to(dtype),
        pooled_projections=torch.randn(batch, 20, generator=g).to(dtype),
        timestep=torch.rand(batch, generator=g) * 1000,
    )


# oneDNN products in the tiny model's forward: block 0 has 3 + 3 QKV projections, 2 output projections and two MLPs
# (fc1 with the GELU, fc2); block 1 (`context_pre_only`) 3 + 3 QKV, 1 output projection and the image MLP
ONEDNN_PRODUCTS = {"linear": 8 + 2 + 7 + 1, "linear_gelu": 3}


@pytest.mark.parametrize("mask", [False, True], ids=["no-mask", "text-mask"])
def test_float32_inference_with_the_fused_ops_matches_the_plain_path_and_sd3(mask, monkeypatch, spy):
    sd3, ours = sd3_and_ours()
    kwargs = model_inputs(torch.float32)
    if mask:
        kwargs["encoder_attention_mask"] = torch.tensor([[1] * 11, [1] * 6 + [0] * 5])
    plain = run_model(ours, kwargs, False, monkeypatch)
    assert spy == {"linear": 0, "linear_gelu": 0, "attention": 0}
    fused_on = run_model(ours, kwargs, True, monkeypatch)
    assert spy == {**ONEDNN_PRODUCTS, "attention": 0}
    assert max_error(fused_on, plain) <= 1e-5  # float32 rounding: another summation order
    if not mask:  # the repo's parity tolerance against SD3
        with torch.no_grad():
            assert max_error(fused_on, sd3(**kwargs).sample) <= 1e-4


@pytest.mark.usefixtures("fused")
def test_float32_training_step_with_the_fused_products_gives_the_plain_gradients(monkeypatch, spy):
    _, ours = sd3_and_ours()
    ours.train()
    kwargs = model_inputs(torch.float32)

    def gradients():
        ours.zero_grad()
        ours(**kwargs).sample.square().mean().backward()
        return {name: p.grad.clone() for name, p in ours.named_parameters() if p.grad is not None}

    gelus = []
    monkeypatch.setattr(fused_ops._TanhGELU, "apply", lambda x, run=fused_ops._TanhGELU.apply: gelus.append(1) or run(x))
    fused_grads = gradients()
    assert spy["linear"] == 2 * (ONEDNN_PRODUCTS["linear"] + ONEDNN_PRODUCTS["linear_gelu"])  # forward + input grad
    assert len(gelus) == ONEDNN_PRODUCTS["linear_gelu"]  # the training GELU after each fc1
    monkeypatch.setattr(fused_ops, "CPU_FUSED_KERNELS", False)
    plain_grads = gradients()
    assert len(gelus) == ONEDNN_PRODUCTS["linear_gelu"]
    assert fused_grads.keys() == plain_grads.keys() and "transformer_blocks.0.img.mlp.fc1.weight" in plain_grads
    for name, grad in plain_grads.items():
        assert max_error(fused_grads[name], grad) <= 1e-4 * grad.abs().max().item() + 1e-9, name


def run_model(model, kwargs, fused_on: bool, monkeypatch, autocast=False):
    """The model's output with the fused ops on or off (under bfloat16 autocast if `autocast`)."""
    monkeypatch.setattr(fused_ops, "CPU_FUSED_KERNELS", fused_on)
    monkeypatch.setattr(fused_ops, "CPU_BF16_ATTENTION", True)
    monkeypatch.setattr(fused_ops, "CPU_BF16_TRAINING_ATTENTION", True)
    monkeypatch.setattr(fused_ops, "CPU_TRAINING_GELU", True)
    monkeypatch.setattr(fused_ops, "ONEDNN_FP32_MAX_NARROW_SIDE", math.inf)
    monkeypatch.setattr(fused_ops, "ONEDNN_FP32_INPUT_GRAD", True)
    monkeypatch.setattr(fused_ops, "MIN_LOGITS", 0)
    monkeypatch.setattr(fused_ops, "ONEDNN_FP32_MIN_MACS", 0)
    monkeypatch.setattr(fused_ops, "ADDCMUL_BACKWARD_MIN_ELEMENTS", 0)
    monkeypatch.setattr(fused_ops, "TRAINING_GELU_MIN_ELEMENTS", 0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return model(**kwargs).sample


@pytest.mark.parametrize("mask", [False, True], ids=["no-mask", "text-mask"])
def test_bfloat16_inference_with_the_fused_ops_is_as_close_to_float32_as_without(mask, monkeypatch, spy):
    sd3, ours = sd3_and_ours()
    kwargs = model_inputs(torch.float32)
    if mask:  # different padding per prompt: the mask reaches the attention
        kwargs["encoder_attention_mask"] = torch.tensor([[1] * 11, [1] * 6 + [0] * 5])
    exact = run_model(ours, kwargs, False, monkeypatch).double()  # float32 weights and inputs, plain ops
    bf16_kwargs = {k: (v.bfloat16() if v.is_floating_point() and k != "timestep" else v) for k, v in kwargs.items()}
    ours_bf16 = ours.to(torch.bfloat16)
    plain = run_model(ours_bf16, bf16_kwargs, False, monkeypatch)
    assert spy == {"linear": 0, "linear_gelu": 0, "attention": 0}
    actual = run_model(ours_bf16, bf16_kwargs, True, monkeypatch)
    assert spy == {**ONEDNN_PRODUCTS, "attention": 2}
    plain_error, fused_error = rms_error(plain, exact), rms_error(actual, exact)
    assert exact.abs().max() > 1.0
    assert fused_error <= 1.1 * plain_error, (fused_error, plain_error)
    if not mask:  # and as close as SD3's own bfloat16 output
        sd3_bf16 = sd3.to(torch.bfloat16)
        with torch.no_grad():
            sd3_error = rms_error(sd3_bf16(**bf16_kwargs).sample, exact)
        assert fused_error <= 1.1 * sd3_error, (fused_error, sd3_error)


def test_autocast_inference_with_the_fused_ops_is_as_close_to_float32_as_without(monkeypatch, spy):
    _, ours = sd3_and_ours()
    kwargs = model_inputs(torch.float32)
    exact = run_model(ours, kwargs, False, monkeypatch).double()
    plain = run_model(ours, kwargs, False, monkeypatch, autocast=True)
    actual = run_model(ours, kwargs, True, monkeypatch, autocast=True)
    assert spy == {**ONEDNN_PRODUCTS, "attention": 2}
    assert rms_error(actual, exact) <= 1.1 * rms_error(plain, exact)


@pytest.mark.usefixtures("fused")
def test_bfloat16_training_keeps_the_plain_products_and_takes_the_training_attention_and_gelu(monkeypatch, spy):
    sd3, ours = sd3_and_ours()
    kwargs = model_inputs(torch.float32)
    bf16_kwargs = {k: (v.bfloat16() if v.is_floating_point() and k != "timestep" else v) for k, v in kwargs.items()}
    trainings, gelus = [], []
    monkeypatch.setattr(attention, "cpu_bf16_training_attention",
                        lambda *args, run=fused_ops.cpu_bf16_training_attention: trainings.append(1) or run(*args))
    monkeypatch.setattr(fused_ops._TanhGELU, "apply", lambda x, run=fused_ops._TanhGELU.apply: gelus.append(1) or run(x))

    def gradients(model, inputs):
        model.train().zero_grad()
        model(**inputs).sample.double().square().mean().backward()
        return torch.cat([p.grad.double().flatten() for p in model.parameters() if p.grad is not None])

    double_kwargs = {k: (v.double() if v.is_floating_point() else v) for k, v in kwargs.items()}
    exact = gradients(copy.deepcopy(ours).double(), double_kwargs)
    sd3_exact = gradients(copy.deepcopy(sd3).double(), double_kwargs)
    sd3_error = rms_error(gradients(sd3.to(torch.bfloat16), bf16_kwargs), sd3_exact)  # the flash backward, SD3's
    ours = ours.to(torch.bfloat16)
    actual = gradients(ours, bf16_kwargs)
    assert spy == {"linear": 0, "linear_gelu": 0, "attention": 0} and len(trainings) == 2  # one per block
    assert len(gelus) == 3  # one per MLP
    monkeypatch.setattr(fused_ops, "CPU_BF16_TRAINING_ATTENTION", False)
    monkeypatch.setattr(fused_ops, "CPU_TRAINING_GELU", False)
    plain = gradients(ours, bf16_kwargs)
    assert len(trainings) == 2 and len(gelus) == 3
    actual_error, plain_error = rms_error(actual, exact), rms_error(plain, exact)
    assert actual_error <= 1.1 * plain_error and actual_error <= 1.1 * sd3_error, (actual_error, plain_error, sd3_error)


@pytest.mark.usefixtures("fused")
@pytest.mark.parametrize("pass_", ["forward", "train"])
def test_compiled_blocks_trace_whole_where_the_fused_paths_are_on(pass_):
    """The fused paths' checks are skipped while compiling, before anything dynamo cannot trace (a thread count
    once made every bfloat16 block two graphs with eager work between them: compiled training steps 1.2x SD3's
    time on an H200): each block compiles as one graph and matches the eager model."""
    _, ours = sd3_and_ours()
    ours = ours.to(torch.bfloat16)
    kwargs = {k: (v.bfloat16() if v.is_floating_point() and k != "timestep" else v)
              for k, v in model_inputs(torch.float32).items()}
    compiled = MMDiTTransformer2DModel.from_config(ours.config).to(torch.bfloat16)
    compiled.load_state_dict(ours.state_dict())
    for block in compiled.transformer_blocks:
        block.compile(fullgraph=True, backend="aot_eager")
    with torch.set_grad_enabled(pass_ == "train"):
        expected, actual = ours(**kwargs).sample, compiled(**kwargs).sample
    assert max_error(actual, expected) <= 2e-2 * expected.abs().max().item()  # bfloat16 roundings apart
    if pass_ == "train":
        expected.float().square().mean().backward()
        actual.float().square().mean().backward()
        grads = [m.transformer_blocks[0].attn.to_q.weight.grad for m in (ours, compiled)]
        assert max_error(*grads) <= 2e-2 * grads[0].abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_joint_sequence_in_either_layout_gives_the_same_attention(dtype, monkeypatch):
    """GPUs join the streams' q, k, v by a plain concatenation along the sequence, CPUs store them heads first:
    same values, same output (the GPU's layout run here on the CPU)."""
    _, ours = sd3_and_ours()
    ours = ours.to(dtype)
    kwargs = {k: (v.to(dtype) if v.is_floating_point() and k != "timestep" else v)
              for k, v in model_inputs(torch.float32).items()}
    kwargs["encoder_attention_mask"] = torch.tensor([[1] * 11, [1] * 6 + [0] * 5])
    with torch.no_grad():
        heads_first = ours(**kwargs).sample
        monkeypatch.setattr(attention, "HEADS_FIRST_DEVICES", set())
        sequence_first = ours(**kwargs).sample
    tolerance = 0 if dtype == torch.float32 else 2e-2
    assert max_error(sequence_first, heads_first) <= tolerance
    assert heads_first.abs().max() > 0.5


# ----------------------------------------------------------------------------------------------------------
# The pipeline's text padding
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("masked", [True, False])
def test_the_pipeline_drops_shared_text_padding_whenever_the_mask_is_on(masked):
    """A masked model's blocks see only the text positions some prompt of the batch uses (guidance included:
    the empty negative prompt is shorter); an unmasked one (SD3's weights) sees every padded position."""
    pipe = tiny_mmdit_pipeline(masked=masked)
    pipe.set_progress_bar_config(disable=True)
    seen = []
    pipe.transformer.transformer_blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[1].shape))
    prompt_embeds, _, _, _, mask, negative_mask = pipe.encode_prompt("a red circle", return_attention_mask=True)
    pipe("a red circle", num_inference_steps=2, height=16, width=16, output_type="latent")
    real = int(torch.cat([mask, negative_mask]).sum(dim=1).max())  # the prompt's (the empty negative has fewer)
    assert 0 < real < prompt_embeds.shape[1]
    expected = real if masked else prompt_embeds.shape[1]
    assert [shape[1] for shape in seen] == [expected, expected]  # two steps, both halves of the guided batch


# ----------------------------------------------------------------------------------------------------------
# The forward's finiteness check (a float32 sum of the output; the inputs' elementwise tests only when it is not finite)
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_the_finite_check_names_the_inputs_of_an_output_that_is_not_finite(dtype):
    large = torch.full((4, 8), 3e38).to(dtype)  # finite, but the float32 sum overflows
    assert not torch.isfinite(large.sum(dtype=torch.float32))
    nan_input = torch.ones(5, dtype=dtype)
    nan_input[2] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_not_finite(large, {"a": large, "b": torch.ones(3, dtype=dtype)})  # a large but finite output
        warn_if_not_finite(torch.ones(3, dtype=dtype), {"a": nan_input})  # a NaN that did not reach the output
    for bad in (float("nan"), float("inf"), -float("inf")):
        values, output = torch.ones(5, dtype=dtype), torch.ones(4, dtype=dtype)
        values[2] = output[1] = bad
        with pytest.warns(RuntimeWarning, match=r"^`b` holds NaN or infinite values"):
            warn_if_not_finite(output, {"a": large, "b": values})


def test_the_gpu_fc1_gelu_epilogue_is_for_half_precision_inference_only():
    """Where `linear_gelu_tanh` takes cuBLASLt's GELU epilogue on a GPU (the path itself is checked against the
    plain ops on a GPU by scripts/gpu_checks.py): no gradient to record (the op has no backward), no autocast,
    half-precision operands of one dtype with a bias."""
    x, weight = torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(16, 8, dtype=torch.bfloat16)
    bias = torch.zeros(16, dtype=torch.bfloat16)
    applies = fused_ops._cuda_epilogue_applies
    assert applies(x, weight, bias)
    assert not applies(x.float(), weight.float(), bias.float())
    assert not applies(x, weight, None)
    assert not applies(x, weight.float(), bias)
    assert not applies(x, weight.requires_grad_(), bias)
    with torch.no_grad():
        assert applies(x, weight, bias)
