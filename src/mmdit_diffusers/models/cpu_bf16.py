"""bfloat16 on CPUs without bfloat16 instructions: matrix products and attention on the float32 kernels.

On x86 CPUs without AVX512-BF16 or AMX, PyTorch runs bfloat16 with generic kernels: matrix products at 8-10
GFLOP/s for `x @ W^T` and ~1.3 GFLOP/s for the backward's `grad @ W`, against 70-90 GFLOP/s for float32 on the
same core, and flash attention's backward ~5x slower than in float32 (benchmarks/README.md). There this model's
projections (`Linear`) and its attention (`scaled_dot_product_attention`) widen their bfloat16 operands exactly,
compute in float32 (products are summed in float32 by the bfloat16 kernels too) and round the result to
bfloat16. Inputs, outputs and gradients stay bfloat16; only the kernels differ. Under
`torch.autocast("cpu", torch.bfloat16)` the inputs are first rounded to bfloat16, as autocast does.

Everything else (float32, float16, GPUs, CPUs with bfloat16 instructions) runs PyTorch's own ops unchanged.
`FP32_KERNEL_FOR_CPU_BF16` switches the path off (benchmarks compare both).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _cpu_has_bf16_instructions() -> bool:
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    if not all(hasattr(cpu, name) for name in checks) or not cpu._is_avx2_supported():
        return True  # not an x86 CPU we know about: keep PyTorch's own kernel
    return any(getattr(cpu, name)() for name in checks)


FP32_KERNEL_FOR_CPU_BF16 = not _cpu_has_bf16_instructions()


class _BF16LinearViaFP32(torch.autograd.Function):
    """y = x W^T + b for bfloat16 tensors, every product computed by the float32 matmul kernel."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        out = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
        return out.to(torch.bfloat16)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad32 = grad.float()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad32 @ weight.float()).to(torch.bfloat16)
        if ctx.needs_input_grad[1]:
            grad_w = (grad32.flatten(0, -2).T @ x.float().flatten(0, -2)).to(torch.bfloat16)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad32.flatten(0, -2).sum(0).to(torch.bfloat16)
        return grad_x, grad_w, grad_b


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, same state dict) with the CPU bfloat16 path described above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if FP32_KERNEL_FOR_CPU_BF16 and x.is_cpu and (x.dtype == torch.bfloat16 or torch.is_autocast_enabled("cpu")):
            return self._bf16_via_fp32_kernel(x)
        return F.linear(x, self.weight, self.bias)

    def _bf16_via_fp32_kernel(self, x: torch.Tensor) -> torch.Tensor:
        autocast_bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        if not autocast_bf16 and not (x.dtype == self.weight.dtype == torch.bfloat16):
            return F.linear(x, self.weight, self.bias)  # other dtype mixes: PyTorch decides (and complains)
        bias = None if self.bias is None else self.bias.to(torch.bfloat16)
        with torch.autocast("cpu", enabled=False):
            return _BF16LinearViaFP32.apply(x.to(torch.bfloat16), self.weight.to(torch.bfloat16), bias)


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """`F.scaled_dot_product_attention`, in float32 for bfloat16 on the CPUs described above."""
    if not (FP32_KERNEL_FOR_CPU_BF16 and q.is_cpu and q.dtype == torch.bfloat16):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    if attn_mask is not None and attn_mask.is_floating_point():
        attn_mask = attn_mask.float()
    with torch.autocast("cpu", enabled=False):
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask)
    return out.to(torch.bfloat16)
