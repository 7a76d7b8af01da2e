"""Fused forms of the block's products, elementwise work and attention, for x86 CPUs with bfloat16 units; and
fc1 + GELU in one product on a GPU.

Where they apply, each does the plain computation in fewer passes over memory or with faster kernels
(benchmarks/README.md has the profiles and timings, `medium` config, 2-core AMD EPYC with AVX512-BF16):

- `linear` / `linear_gelu_tanh`: the block's products (QKV, output projections, MLP) as oneDNN products
  (`torch.ops.mkldnn._linear_pointwise`), and `gelu(fc1(x), approximate="tanh")` as one product with GELU applied
  to its output tile. Without gradients: bfloat16 weights, bfloat16 autocast (the operands cast to bfloat16 as
  autocast would; the GELU's result rounded once instead of twice), or float32, where oneDNN's products take
  0.86-0.89 of MKL's time at the `medium` shapes on an AMD EPYC (0.61-0.80 with the GELU), from
  `ONEDNN_FP32_MIN_MACS` multiply-adds per product (smaller ones stay PyTorch's, faster there); on Intel CPUs, where
  MKL's wide float32 products are faster, only those with a side of at most `ONEDNN_FP32_MAX_NARROW_SIDE`
  features (fc1 + GELU at any width). With gradients: float32 only (`_OneDNNLinear`: oneDNN forward, the input
  gradient by oneDNN where `ONEDNN_FP32_INPUT_GRAD`, else by PyTorch's `mm` as the weight's gradient always is). float32 is then no
  longer bit for bit PyTorch's ops: oneDNN sums in another order (~1e-6 relative), within the repo's 1e-4 parity
  tolerance of SD3; a LoRA-wrapped layer (PEFT's, which calls its base layer directly) takes the plain path and
  agrees with the bare layer to that rounding, not bit for bit. In bfloat16 oneDNN's products are those of
  PyTorch's own bfloat16 `addmm`.
- `modulate` / `add_gated`: `x * (1 + scale) + shift` and `x + gate * y` as one `addcmul` (one rounding) for
  bfloat16 / float16 tensors; float32 keeps the two ops, as SD3 computes them.
- `cpu_bf16_attention`: softmax(q k^T / sqrt(d)) v for bfloat16 q, k, v, one sample at a time (its scores stay in
  cache): logits in float32 from the bfloat16 values (exact products, float32 sums, as the flash kernel), softmax
  in float32, probabilities rounded to bfloat16 for the product with v (as the flash kernel does); up to 16 MiB
  of logits per sample (`MAX_LOGITS_BYTES`), from 128k logits (`MIN_LOGITS`; below, the flash kernel is faster),
  on one intra-op thread only (its many small ops per sample made a `medium` forward 1.24x SD3's time on two
  threads of a shared 2-core machine, against 0.83x without it; the flash kernel parallelises in one op), and not
  on CPUs with AMX (`CPU_BF16_ATTENTION`), where the flash kernel's bfloat16 tile products beat its float32 logits.
- `gelu_tanh`: the tanh GELU for bfloat16 and float32 training on CPUs with AMX, one intra-op thread:
  x * sigmoid(2u) in float32 over L2-sized chunks (vectorised) instead of PyTorch's Sleef tanh, the derivative
  written in the forward so the backward is one product (bfloat16: 0.58-0.66 of PyTorch's forward + backward time,
  the input gradient's error ~1.55x; float32: 0.73-0.80 at [4, 256, 2048], 0.62-0.83 at [4, 77, 2048], the input
  gradient within a few float32 steps).
- `modulate` / `add_gated` in training on those CPUs (`_Addcmul`): autograd's gradients bit for bit, one pass fewer.
- `cpu_bf16_training_attention`: the same attention with gradients, for bfloat16 training on CPUs with AMX
  (`CPU_BF16_TRAINING_ATTENTION`), whose flash backward leaves the tiles idle: the flash kernel's forward (the same
  output) and a backward of bfloat16 batched products, each quantity rounded once relative to itself
  (`_bf16_attention_backward`); 0.52-0.75 of the flash backward's time at `medium`'s 333 tokens, 0.28-0.36 at
  96-180; its gradients' error against float64 is the flash kernel's for dV, 1.2-1.4x it for dK, 1.2-1.7x for dQ.

The fused paths run only where they were measured faster (x86 with AVX512-BF16 or AMX, oneDNN present:
`CPU_FUSED_KERNELS`), on CPU tensors, outside torch.compile (inductor fuses on its own), forward-mode AD and
torch.func transforms, on plain `nn.Linear` layers without hooks; elsewhere (an AVX2-only CPU, a GPU but for the
fc1 + GELU below) every call is exactly the plain op. Packed (reordered) weights are not cached: a cache keyed on a weight's version counter and address misses in-place writes through
`.data` (PEFT's LoRA merge, diffusers' EMA `copy_to`), so it could serve a stale product.

On a GPU, `linear_gelu_tanh` in bfloat16 / float16 inference is one cuBLASLt product with the bias and the tanh GELU
in its epilogue (`torch._addmm_activation`): fc1 + GELU 0.25 against 0.29 ms at SD3-Medium size on an H200, the
same error against a float32 reference (benchmarks/README.md, GPU).
"""

from __future__ import annotations

import math
import platform

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn as nn
import torch.nn.functional as F


def x86_bf16_instructions() -> bool | None:
    """Whether this x86 CPU has AVX512-BF16 or AMX (PyTorch's bfloat16 kernels use them); None where PyTorch cannot
    tell (not x86 with AVX2, or a build without the probes). False too in a process held to PyTorch's AVX2 kernels
    (`ATEN_CPU_CAPABILITY=avx2`): it runs as on an AVX2-only CPU (benchmarks/README.md, "AVX2 rows on another
    CPU")."""
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    if not all(hasattr(cpu, name) for name in checks) or not cpu._is_avx2_supported():
        return None
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False
    return any(getattr(cpu, name)() for name in checks)


def _intel_cpu() -> bool:
    """Whether this is an Intel CPU (`vendor_id` GenuineIntel in /proc/cpuinfo, else the platform's processor name)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return any(line.startswith("vendor_id") and "GenuineIntel" in line for line in cpuinfo)
    except OSError:
        return "intel" in platform.processor().lower()


def x86_amx() -> bool:
    """Whether this x86 CPU has AMX tiles (PyTorch's bfloat16 products and its CPU flash attention use them), with
    `x86_bf16_instructions`' caveat."""
    return bool(x86_bf16_instructions()) and torch.cpu._is_amx_tile_supported()


# Module-level so that tests can turn the fused paths on (or off) on any CPU.
CPU_FUSED_KERNELS = bool(x86_bf16_instructions()) and torch.backends.mkldnn.is_available()
# float32 products (without GELU, and in training) through oneDNN where they beat MKL's. On an AMD EPYC: every size
# from ONEDNN_FP32_MIN_MACS (0.86-0.89 of MKL's time), input gradients too. On an Intel Xeon (AMX), whose MKL
# kernels are Intel's own: forward 0.90-0.96 of MKL's time where the layer has 256 or fewer input or output
# features (the Shapes model's width 128), 1.00-1.08 where both are 384 or more (the `medium` config's 512-2048);
# input gradients 1.02-1.16 (benchmarks/README.md, "on a CPU with AMX"). fc1 + GELU stays fused at every width:
# the GELU pass it saves wins on both.
_INTEL = _intel_cpu()
ONEDNN_FP32_MAX_NARROW_SIDE = 256 if _INTEL else math.inf
ONEDNN_FP32_INPUT_GRAD = not _INTEL
# `cpu_bf16_attention` where it beat the flash kernel: AVX512-BF16 without AMX. With AMX the flash kernel's
# bfloat16 tile products win (a `medium` bf16 forward took 1.095x the time with it: benchmarks/README.md).
CPU_BF16_ATTENTION = not x86_amx()

_LOW_PRECISION = (torch.bfloat16, torch.float16)
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)
_PLAIN_TENSORS = (nn.Parameter, torch.Tensor)
# float32 products through oneDNN from this many multiply-adds: below, its per-call setup (~10 us) outweighs its
# faster kernel (the `tiny` config's: 1.2-1.7x MKL's time; break-even near 8M)
ONEDNN_FP32_MIN_MACS = 2**24


def _on_cpu_eagerly(*tensors: torch.Tensor) -> bool:
    """The fused paths' first condition: on (where tests force them: `CPU_FUSED_KERNELS`), CPU tensors, not
    compiling (inductor fuses on its own), outside forward-mode AD and torch.func transforms (the oneDNN ops have
    no forward derivative: a tangent would be dropped without an error)."""
    if not CPU_FUSED_KERNELS or torch.compiler.is_compiling() or forward_ad._current_level >= 0:
        return False
    return all(t.device.type == "cpu" and not torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def _records_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _inference_on_cpu(*tensors: torch.Tensor) -> bool:
    """CPU tensors, no gradient recorded through them, not compiling."""
    return _on_cpu_eagerly(*tensors) and not _records_grad(*tensors)


def _autocast_bf16() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def _onednn_operands(linear: nn.Linear, x: torch.Tensor, gelu: bool = False):
    """(x, weight, bias, records_grad) for oneDNN's product of `linear` (followed by a GELU if `gelu`) where it
    applies, else None: a plain `nn.Linear` (not a LoRA wrapper or `cpu_bf16`'s layer) without hooks, with plain
    tensors for parameters, on the CPU; with no gradient recorded, float32 or bfloat16 (or bfloat16 autocast, the
    operands cast as autocast casts them); with gradients, float32 without autocast (in bfloat16 oneDNN's products
    are PyTorch's own, and autocast's backward is autocast's). float32 products without the GELU, and all of them
    in training, only with at most `ONEDNN_FP32_MAX_NARROW_SIDE` input or output features."""
    # the cheap tests first (a `tiny` model's products take a few microseconds): where nothing applies, the plain
    # path pays a few attribute reads
    if not CPU_FUSED_KERNELS or type(linear) is not nn.Linear:
        return None
    weight, bias = linear.weight, linear.bias
    autocast = torch.is_autocast_enabled("cpu")
    if x.dtype == torch.float32 and not autocast:
        if x.numel() * weight.shape[0] < ONEDNN_FP32_MIN_MACS or (
                min(weight.shape) > ONEDNN_FP32_MAX_NARROW_SIDE and not (gelu and not torch.is_grad_enabled())):
            return None
    if linear._forward_hooks or linear._forward_pre_hooks or "forward" in linear.__dict__ \
            or type(weight) not in _PLAIN_TENSORS or (bias is not None and type(bias) not in _PLAIN_TENSORS) \
            or not _on_cpu_eagerly(x, weight):
        return None  # a tensor subclass (torchao's quantized weights, DTensor) has its own F.linear
    records_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                or (bias is not None and bias.requires_grad))
    if records_grad:
        if autocast or x.dtype != torch.float32:
            return None
    elif autocast:
        if not _autocast_bf16():
            return None
        x, weight = x.to(torch.bfloat16), weight.to(torch.bfloat16)
        bias = None if bias is None else bias.to(torch.bfloat16)
    if x.dtype not in _ONEDNN_DTYPES or weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        return None
    return x.contiguous(), weight, bias, records_grad  # F.linear copies a strided input too


class _OneDNNLinear(torch.autograd.Function):
    """`F.linear(x, weight, bias)` in float32 with gradients: oneDNN's product forward and, where
    `ONEDNN_FP32_INPUT_GRAD`, for the input's gradient (0.86-0.89 and 0.87-0.94 of MKL's time at the `medium` shapes
    on an AMD EPYC); the weight's gradient by PyTorch's `mm` (oneDNN is no faster there). Saves what `F.linear` saves
    (x and the weight)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = (torch.ops.mkldnn._linear_pointwise(grad.contiguous(), weight.t(), None, "none", [], "")
                      if ONEDNN_FP32_INPUT_GRAD else grad @ weight)
        grad_2d = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_weight = grad_2d.t() @ x.reshape(-1, x.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_2d.sum(0)
        return grad_x, grad_weight, grad_bias


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)`, as oneDNN's product where it applies (see the module docstring)."""
    operands = _onednn_operands(layer, x)
    if operands is None:
        return layer(x)
    x, weight, bias, records_grad = operands
    if records_grad:
        return _OneDNNLinear.apply(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def linear_gelu_tanh(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`F.gelu(layer(x), approximate="tanh")`: without gradients, one oneDNN product with the GELU applied to its
    output tile on a CPU, one cuBLASLt product with the GELU in its epilogue on a GPU, where they apply (see the
    module docstring)."""
    operands = _onednn_operands(layer, x, gelu=True)
    if operands is None:
        if x.is_cuda and type(layer) is nn.Linear and not (layer._forward_hooks or layer._forward_pre_hooks) \
                and "forward" not in layer.__dict__ and _cuda_epilogue_applies(x, layer.weight, layer.bias):
            out = torch._addmm_activation(layer.bias, x.reshape(-1, x.shape[-1]), layer.weight.t(), use_gelu=True)
            return out.view(*x.shape[:-1], out.shape[-1])
        return gelu_tanh(layer(x))
    x, weight, bias, records_grad = operands
    if records_grad:  # GELU's backward reads the product
        return gelu_tanh(_OneDNNLinear.apply(x, weight, bias))
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "tanh")


def _cuda_epilogue_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """cuBLASLt's product with the bias and the tanh GELU in its epilogue: half-precision inference on a GPU with
    plain tensors, outside autocast, torch.compile (inductor fuses the GELU on its own), forward-mode AD and
    torch.func transforms (the op has no derivatives)."""
    return (x.dtype in _LOW_PRECISION and weight.dtype == x.dtype and bias is not None and bias.dtype == x.dtype
            and type(weight) in _PLAIN_TENSORS and type(bias) in _PLAIN_TENSORS
            and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cuda")
            and forward_ad._current_level < 0 and not torch._C._functorch.is_functorch_wrapped_tensor(x)
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad)))


# `gelu_tanh`'s own kernel for bfloat16 training on one intra-op thread, on CPUs with AMX (where it was measured):
# PyTorch's tanh GELU and its backward evaluate tanh with Sleef (~0.4 G elements/s: 5.6-6.0 ms forward and 6 ms
# backward at `medium`'s [4, 256, 2048]); float32 `tanh` (MKL's) and `sigmoid` take ~1.0 ms there. Forward and
# backward: 0.66 of PyTorch's time at [4, 256, 2048] and [4, 77, 2048] (0.71 / 0.64 in the tanh form it replaced);
# on two threads, where PyTorch's kernels split the work, 0.95-1.03 (benchmarks/README.md, "on a CPU with AMX",
# changes 4 and 5). float32 (no widening; PyTorch's float32 GELU is as slow): 0.73-0.80 of its time at [4, 256, 2048],
# 0.62-0.83 at [4, 77, 2048] (change 6).
CPU_TRAINING_GELU = x86_amx()
# Elements per float32 pass: four 256 KiB buffers (two for float32 input), in L2 (the bfloat16 forward alone at
# [4, 256, 2048]: 0.62 of F.gelu's time; 0.73 at 32,768 elements, 0.67 at 131,072, 0.98 at 262,144; float32 forward +
# backward 0.80 against 0.82 at 32,768 and 0.87 at 131,072)
GELU_CHUNK = 65536
_TRAINING_GELU_DTYPES = (torch.bfloat16, torch.float32)
# `_TanhGELU` from this many elements: below, its own cost (~0.1-0.2 ms: the Function, its buffers) outweighs what it
# saves (forward + backward at 4k-65k elements 1.3-3.8x PyTorch's time in bfloat16, 0.96-2.9x in float32: the
# `tiny` config's 16k-32k; at 131k 0.85 / 1.04, at 262k-524k 0.79-0.96)
TRAINING_GELU_MIN_ELEMENTS = 2**17
_SQRT_2_OVER_PI, _GELU_CUBIC = math.sqrt(2 / math.pi), 0.044715


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """`F.gelu(x, approximate="tanh")`; for bfloat16 or float32 with a gradient to record on one intra-op thread
    (CPUs with AMX), from `TRAINING_GELU_MIN_ELEMENTS`, `_TanhGELU`: a faster forward and a one-pass backward.
    bfloat16: the same output except in ~1e-4 of its elements (one bfloat16 step apart: another float32 tanh before
    the rounding); float32: the output within float32 rounding of PyTorch's."""
    if CPU_TRAINING_GELU and x.dtype in _TRAINING_GELU_DTYPES and x.numel() >= TRAINING_GELU_MIN_ELEMENTS \
            and _on_cpu_eagerly(x) and _records_grad(x) and torch.get_num_threads() == 1:
        return _TanhGELU.apply(x)
    return F.gelu(x, approximate="tanh")


class _TanhGELU(torch.autograd.Function):
    """y = x (1 + tanh u) / 2 = x p, p = sigmoid(2u), u = c (x + 0.044715 x^3), c = sqrt(2 / pi), in float32 over
    L2-sized chunks (PyTorch's float32 `sigmoid` is vectorised, as MKL's `tanh` is, where its bfloat16 tanh GELU
    calls Sleef's scalar-speed tanh), rounded once to bfloat16 as PyTorch's kernel rounds it. The forward also
    writes the derivative, y' = p + 2 x u' p (1 - p), u' = c (1 + 3 * 0.044715 x^2), rounded to bfloat16 and kept
    instead of x (the same memory), so the backward is one product g * y'. That second rounding makes the input
    gradient's error ~1.55x the plain backward's (relative RMS against float64; tests/test_fast_paths.py).
    float32 input is read as it is (no widened copy), output and derivative unrounded; p + q (1 - p) keeps
    ~1e-6 of q where p nears 1 (x > ~3): the input gradient's RMS error 1.2-2.3x PyTorch's, ~1e-7 relative (a
    separate sigmoid(-2u) for 1 - p cost half the time saved)."""

    @staticmethod
    def forward(ctx, x):
        flat = x.contiguous().view(-1)
        out, derivative = torch.empty_like(flat), torch.empty_like(flat)
        size = min(GELU_CHUNK, max(flat.numel(), 1))
        widen = x.dtype != torch.float32  # bfloat16: each chunk widened to float32, the results rounded back
        buffers = [torch.empty(size) for _ in range(4 if widen else 2)]
        c1 = _SQRT_2_OVER_PI * _GELU_CUBIC
        two_c0 = torch.tensor(2 * _SQRT_2_OVER_PI)
        with torch.autocast("cpu", enabled=False):
            for start in range(0, flat.numel(), size):
                part = slice(start, start + size)
                n = flat[part].numel()
                p, q = buffers[0][:n], buffers[1][:n]
                xf = buffers[2][:n].copy_(flat[part]) if widen else flat[part]
                torch.sigmoid(torch.addcmul(two_c0, xf, xf, value=2 * c1, out=p).mul_(xf), out=p)  # sigmoid(2u)
                y = buffers[3][:n] if widen else out[part]
                torch.mul(xf, p, out=y)
                if widen:
                    out[part].copy_(y)
                torch.addcmul(two_c0, xf, xf, value=6 * c1, out=q).mul_(xf).mul_(p)  # 2 x u' p
                dy = buffers[3][:n] if widen else derivative[part]
                torch.addcmul(q, q, p, value=-1, out=dy).add_(p)  # p + 2 x u' p (1 - p)
                if widen:
                    derivative[part].copy_(dy)
        ctx.save_for_backward(derivative.view_as(x))
        return out.view_as(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (derivative,) = ctx.saved_tensors
        return grad_out * derivative


def modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """`x * (1 + scale) + shift` (AdaLN), one `addcmul` (one rounding) in bfloat16 / float16."""
    if x.dtype in _LOW_PRECISION and scale.dtype == x.dtype and shift.dtype == x.dtype:
        return _addcmul(shift, x, 1 + scale)
    return x * (1 + scale) + shift


def add_gated(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`x + gate * y` (a gated residual), one `addcmul` (one rounding) in bfloat16 / float16."""
    if x.dtype in _LOW_PRECISION and gate.dtype == x.dtype and y.dtype == x.dtype:
        return _addcmul(x, gate, y)
    return x + gate * y


# `_Addcmul` from this many elements in its largest operand: one forward + backward at [4, 256, 512] (`medium`'s image
# stream) took 0.83-0.92 of autograd's time, at [4, 77, 512] 0.99-1.01, and below ~150k elements the Function's own
# cost (~40 us) outweighs the pass it saves (1.08-1.70x autograd's time at 8k-131k: the `tiny` config's sizes)
ADDCMUL_BACKWARD_MIN_ELEMENTS = 2**18


def _addcmul(x: torch.Tensor, tensor1: torch.Tensor, tensor2: torch.Tensor) -> torch.Tensor:
    """`torch.addcmul(x, tensor1, tensor2)`; in training on a CPU with the fused paths, from
    `ADDCMUL_BACKWARD_MIN_ELEMENTS`, `_Addcmul`'s backward."""
    if max(x.numel(), tensor1.numel(), tensor2.numel()) >= ADDCMUL_BACKWARD_MIN_ELEMENTS \
            and _on_cpu_eagerly(x, tensor1, tensor2) and _records_grad(x, tensor1, tensor2):
        return _Addcmul.apply(x, tensor1, tensor2)
    return torch.addcmul(x, tensor1, tensor2)


class _Addcmul(torch.autograd.Function):
    """`torch.addcmul(x, tensor1, tensor2)` with the same gradients, bit for bit, in one pass fewer: autograd's
    backward multiplies the full-size operand by `value` (1) before the product with the gradient, a pass over
    [B, S, D] for each AdaLN modulation and gated residual (~1% of a `medium` bfloat16 training step on AMX)."""

    @staticmethod
    def forward(ctx, x, tensor1, tensor2):
        ctx.save_for_backward(tensor1, tensor2)
        ctx.x_shape = x.shape
        return torch.addcmul(x, tensor1, tensor2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        tensor1, tensor2 = ctx.saved_tensors
        grad_x = grad.sum_to_size(ctx.x_shape) if ctx.needs_input_grad[0] else None
        grad_1 = (grad * tensor2).sum_to_size(tensor1.shape) if ctx.needs_input_grad[1] else None
        grad_2 = (grad * tensor1).sum_to_size(tensor2.shape) if ctx.needs_input_grad[2] else None
        return grad_x, grad_1, grad_2


# One sample's float32 logits between these sizes: below, the flash kernel is faster (`tiny`: 37k logits, 1.9x
# the flash kernel's time); above, it never holds them (the `medium` benchmark config: 887k, 3.5 MiB).
MIN_LOGITS = 2**17
MAX_LOGITS_BYTES = 16 * 2**20


def cpu_bf16_attention_applies(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether `cpu_bf16_attention` takes these [B, S, heads, head_dim] tensors."""
    # device and compiling first: under torch.compile `get_num_threads()` is a graph break in every block
    if not (CPU_FUSED_KERNELS and CPU_BF16_ATTENTION) or query.dtype != torch.bfloat16 \
            or not _inference_on_cpu(query, key, value) \
            or torch.get_num_threads() != 1:
        return False
    logits = query.shape[1] * query.shape[2] * key.shape[1]
    return key.dtype == value.dtype == torch.bfloat16 and MIN_LOGITS <= logits <= MAX_LOGITS_BYTES // 4


def cpu_bf16_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) v over [B, S, heads, head_dim] bfloat16 tensors (the layout of diffusers'
    attention dispatch), one sample at a time; `attn_mask` [B, 1, 1, S_kv] bool (True = attend), as PyTorch's SDPA
    takes it. Returns [B, S, heads, head_dim] bfloat16."""
    scale = 1 / math.sqrt(query.shape[-1])
    out = torch.empty(query.shape[0], query.shape[2], query.shape[1], query.shape[3], dtype=query.dtype)
    with torch.autocast("cpu", enabled=False):
        for b in range(query.shape[0]):
            q, k, v = (t[b].transpose(0, 1) for t in (query, key, value))  # [heads, S, head_dim]
            logits = torch.matmul(q.float().mul_(scale), k.float().transpose(1, 2))
            if attn_mask is not None:
                logits.masked_fill_(~attn_mask[b], float("-inf"))
            torch.matmul(torch.softmax(logits, dim=-1).to(value.dtype), v, out=out[b])
    return out.transpose(1, 2)


# `cpu_bf16_training_attention` where PyTorch's CPU flash backward leaves the bfloat16 tiles idle: CPUs with AMX
# (`medium`: its backward 30 ms a call, ~80 GFLOP/s on a ~1,100 GFLOP/s machine; this one 0.52-0.75 of that time).
CPU_BF16_TRAINING_ATTENTION = x86_amx()
# One chunk of heads' bfloat16 scores in the backward, [heads, keys, queries]: about the size of one core's L2 cache
# (`medium`, 333 tokens: 8 heads a chunk, 0.52 of the flash backward's time against 0.59 at 4 and 0.65 at 2).
BACKWARD_CHUNK_BYTES = 2 * 2**20


def cpu_bf16_training_attention_applies(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                        attn_mask: torch.Tensor | None) -> bool:
    """Whether `cpu_bf16_training_attention` takes these [B, S, heads, head_dim] tensors: bfloat16, on a CPU with
    AMX, with a gradient to record, without a mask (at every size: 0.28-0.36 of the flash backward's time at
    96-180 tokens, 0.52-0.82 at 256-333)."""
    return (CPU_FUSED_KERNELS and CPU_BF16_TRAINING_ATTENTION and attn_mask is None
            and all(t.dtype == torch.bfloat16 for t in (query, key, value))
            and _on_cpu_eagerly(query, key, value) and _records_grad(query, key, value))


def cpu_bf16_training_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) v over [B, S, heads, head_dim] bfloat16 tensors, for training: the forward is
    PyTorch's CPU flash kernel (the same output), the backward `_bf16_attention_backward`."""
    out = _FlashForwardTileBackward.apply(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
    return out.transpose(1, 2)


class _FlashForwardTileBackward(torch.autograd.Function):
    """[B, heads, S, head_dim] attention: the flash kernel's forward, which keeps what its backward keeps (q, k, v,
    the output and the rows' log-sum-exp), and the backward in bfloat16 batched products."""

    @staticmethod
    def forward(ctx, query, key, value):
        out, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value)[:2]
        ctx.save_for_backward(query, key, value, out, logsumexp)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        with torch.autocast("cpu", enabled=False):
            return _bf16_attention_backward(grad_out, *ctx.saved_tensors)


def _split_bf16(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 x as two bfloat16 tensors whose sum is x to ~16 bits."""
    hi = x.to(torch.bfloat16)
    return hi, (x - hi.float()).to(torch.bfloat16)


def _bf16_attention_backward(grad_out, query, key, value, out, logsumexp):
    """The gradients of O = P v, P = softmax(s q k^T) for [B, heads, S, head_dim] bfloat16 tensors, from the forward's
    O and the rows' log-sum-exp L: dV = P^T dO, dS = P * (dO v^T - D) with D = rowsum(dO * O), dQ = s dS k,
    dK = s dS^T q; transposed (P^T, dS^T: [keys, queries]) so that dV and dK are untransposed products.

    The flash backward's five products and one more, all on bfloat16 operands, which is what makes it fast (the
    tiles); a bfloat16 product sums in float32 and rounds its output once, so each quantity is arranged to be
    rounded once, relative to itself:
    - log2 P = (s / ln 2) (q.k - L / s) is one product: -L / s enters as two extra columns of q (its bfloat16 high
      and low parts) over two columns of ones in k. Its bfloat16 rounding would still move P by up to 1% where
      |log P| ~ 5, so a second product gives the remainder, lo = bf16(x - hi) (`baddbmm` with beta = -1 subtracts hi
      before rounding), and P = 2^hi (1 + ln2 lo), rounded to bfloat16 (the flash kernel rounds P so for dV).
    - dO v^T - D likewise, with -D as two extra columns of dO: one rounding relative to the difference, where
      rounding dO v^T alone would lose what the subtraction cancels.
    Against a float64 reference the gradients' error is the flash backward's for dV, 1.2-1.4x it for dK and
    1.2-1.7x for dQ (dS is rounded twice where the flash kernel rounds it once; tests/test_fast_paths.py)."""
    batch, heads, n_q, dim = query.shape
    rows = batch * heads
    scale = 1 / math.sqrt(dim)
    query, key, value, out, grad_out = (t.reshape(rows, -1, dim) for t in (query, key, value, out, grad_out))
    n_k = key.shape[1]
    minus_lse = _split_bf16(logsumexp.reshape(rows, n_q, 1) / -scale)  # -L / s
    minus_d = _split_bf16((grad_out.float() * out.float()).sum(-1, keepdim=True).neg_())  # -D
    ones = query.new_ones(rows, n_k, 2)
    query_aug, key_aug = torch.cat([query, *minus_lse], -1), torch.cat([key, ones], -1)
    grad_aug, value_aug = torch.cat([grad_out, *minus_d], -1), torch.cat([value, ones], -1)
    grad_q, grad_k, grad_v = (torch.empty_like(t) for t in (query, key, value))
    zero, log2_scale = query.new_zeros(()), scale / math.log(2)
    chunk = max(1, BACKWARD_CHUNK_BYTES // (2 * n_q * n_k))
    for start in range(0, rows, chunk):
        part = slice(start, start + chunk)
        query_t = query_aug[part].transpose(1, 2)
        hi = torch.baddbmm(zero, key_aug[part], query_t, beta=0, alpha=log2_scale)  # log2 P^T, [chunk, keys, queries]
        probs_t = torch.exp2(hi)
        lo = hi.baddbmm_(key_aug[part], query_t, beta=-1, alpha=log2_scale)  # in place: hi is spent
        probs_t = torch.addcmul(probs_t, probs_t, lo, value=math.log(2), out=lo)
        torch.bmm(probs_t, grad_out[part], out=grad_v[part])
        grad_scores_t = torch.bmm(value_aug[part], grad_aug[part].transpose(1, 2))  # (dO v^T - D)^T
        torch.addcmul(zero, grad_scores_t, probs_t, value=scale, out=grad_scores_t)  # s dS^T: dK, dQ come out scaled
        torch.bmm(grad_scores_t, query[part], out=grad_k[part])
        torch.bmm(grad_scores_t.transpose(1, 2), key[part], out=grad_q[part])
    return tuple(g.view(batch, heads, -1, dim) for g in (grad_q, grad_k, grad_v))
