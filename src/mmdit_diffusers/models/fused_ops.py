"""Fused forms of the block's elementwise work and of its attention: for inference on x86 CPUs with bfloat16 units,
and fc1 + GELU on a GPU.

Where they apply, each does the plain computation in fewer passes over memory (benchmarks/README.md has the
profiles and timings, `medium` config, 2-core AMD EPYC with AVX512-BF16):

- `linear_gelu_tanh`: `gelu(fc1(x), approximate="tanh")` as one oneDNN product with GELU applied to its output
  tile (`torch.ops.mkldnn._linear_pointwise`), instead of a product and a separate GELU pass (the GELU alone was
  8% of a bfloat16 forward). bfloat16 weights, or float32 ones under CPU autocast (the operands cast to bfloat16
  as autocast would); the result is rounded once instead of twice (closer to float32). Not float32: oneDNN sums
  in another order than PyTorch's float32 product (MKL), and float32 stays bit for bit the plain computation
  (a LoRA-wrapped layer, which takes the plain path, must give the same output as the bare one).
- `modulate` / `add_gated`: `x * (1 + scale) + shift` and `x + gate * y` as one `addcmul` (one rounding) for
  bfloat16 / float16 tensors; float32 keeps the two ops, as SD3 computes them.
- `cpu_bf16_attention`: softmax(q k^T / sqrt(d)) v for bfloat16 q, k, v, one sample at a time (its scores stay in
  cache): logits in float32 from the bfloat16 values (exact products, float32 sums, as the flash kernel), softmax
  in float32, probabilities rounded to bfloat16 for the product with v (as the flash kernel does); up to 16 MiB
  of logits per sample (`MAX_LOGITS_BYTES`), from 128k logits (`MIN_LOGITS`; below, the flash kernel is faster),
  on one intra-op thread only (its many small ops per sample made a `medium` forward 1.24x SD3's time on two
  threads of a shared 2-core machine, against 0.83x without it; the flash kernel parallelises in one op).

On a GPU, `linear_gelu_tanh` in bfloat16 / float16 inference is one cuBLASLt product with the bias and the tanh GELU
in its epilogue (`torch._addmm_activation`): fc1 + GELU 0.25 against 0.29 ms at SD3-Medium size on an H200, the
same error against a float32 reference (benchmarks/README.md, GPU).

The CPU paths run only where they were measured faster (x86 with AVX512-BF16 or AMX, oneDNN present), on CPU
tensors, when no gradient is recorded and outside torch.compile (inductor fuses on its own); everything else takes
the plain ops.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def x86_bf16_instructions() -> bool | None:
    """Whether this x86 CPU has AVX512-BF16 or AMX (PyTorch's bfloat16 kernels use them); None where PyTorch cannot
    tell (not x86 with AVX2, or a build without the probes)."""
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    if not all(hasattr(cpu, name) for name in checks) or not cpu._is_avx2_supported():
        return None
    return any(getattr(cpu, name)() for name in checks)


# Module-level so that tests can turn the fused paths on (or off) on any CPU.
CPU_FUSED_KERNELS = bool(x86_bf16_instructions()) and torch.backends.mkldnn.is_available()

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _inference_on_cpu(*tensors: torch.Tensor) -> bool:
    """The fused paths' shared condition: CPU tensors, no gradient recorded through them, not compiling."""
    if not CPU_FUSED_KERNELS or torch.compiler.is_compiling():
        return False
    if any(t.device.type != "cpu" for t in tensors):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def _autocast_bf16() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def linear_gelu_tanh(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`F.gelu(linear(x), approximate="tanh")`, fused where it applies (see the module docstring). A layer that is
    not a plain `nn.Linear` (a LoRA wrapper, `cpu_bf16`'s layer) or carries hooks takes the plain path."""
    # the cheap tests first: the plain (float32) path pays a few attribute reads
    if CPU_FUSED_KERNELS and (x.dtype == torch.bfloat16 or torch.is_autocast_enabled("cpu")) \
            and type(linear) is nn.Linear and not (linear._forward_hooks or linear._forward_pre_hooks) \
            and "forward" not in linear.__dict__ and _inference_on_cpu(x, linear.weight) and x.is_contiguous():
        weight, bias = linear.weight, linear.bias
        if _autocast_bf16():
            x, weight = x.to(torch.bfloat16), weight.to(torch.bfloat16)
            bias = None if bias is None else bias.to(torch.bfloat16)
        if x.dtype == weight.dtype == torch.bfloat16 and (bias is None or bias.dtype == x.dtype):
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "tanh")
    if x.is_cuda and type(linear) is nn.Linear and not (linear._forward_hooks or linear._forward_pre_hooks) \
            and "forward" not in linear.__dict__ and _cuda_epilogue_applies(x, linear.weight, linear.bias):
        out = torch._addmm_activation(linear.bias, x.reshape(-1, x.shape[-1]), linear.weight.t(), use_gelu=True)
        return out.view(*x.shape[:-1], out.shape[-1])
    return F.gelu(linear(x), approximate="tanh")


def _cuda_epilogue_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """cuBLASLt's product with the bias and the tanh GELU in its epilogue: half-precision inference on a GPU,
    outside autocast and torch.compile (inductor fuses the GELU on its own)."""
    return (x.dtype in _LOW_PRECISION and weight.dtype == x.dtype and bias is not None and bias.dtype == x.dtype
            and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cuda")
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """`x * (1 + scale) + shift` (AdaLN), one `addcmul` (one rounding) in bfloat16 / float16."""
    if x.dtype in _LOW_PRECISION and scale.dtype == x.dtype and shift.dtype == x.dtype:
        return torch.addcmul(shift, x, 1 + scale)
    return x * (1 + scale) + shift


def add_gated(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`x + gate * y` (a gated residual), one `addcmul` (one rounding) in bfloat16 / float16."""
    if x.dtype in _LOW_PRECISION and gate.dtype == x.dtype and y.dtype == x.dtype:
        return torch.addcmul(x, gate, y)
    return x + gate * y


# One sample's float32 logits between these sizes: below, the flash kernel is faster (`tiny`: 37k logits, 1.9x
# the flash kernel's time); above, it never holds them (the `medium` benchmark config: 887k, 3.5 MiB).
MIN_LOGITS = 2**17
MAX_LOGITS_BYTES = 16 * 2**20


def cpu_bf16_attention_applies(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether `cpu_bf16_attention` takes these [B, S, heads, head_dim] tensors."""
    # device and compiling first: under torch.compile `get_num_threads()` is a graph break in every block
    if not CPU_FUSED_KERNELS or query.dtype != torch.bfloat16 or not _inference_on_cpu(query, key, value) \
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
