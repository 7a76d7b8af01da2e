"""bfloat16 on CPUs without bfloat16 instructions: a model's matrix products and attention on the float32 kernels.

On x86 CPUs without AVX512-BF16 or AMX, PyTorch runs bfloat16 with generic kernels. Measured on a 2-core AMD EPYC
(AVX2 + FMA, no AVX512-BF16 / AMX; benchmarks/README.md): `x @ W^T` (`F.linear`'s forward) 8-10 GFLOP/s, the
backward's `g @ W` 1.2-1.3 GFLOP/s and `g^T @ x` 15-21 GFLOP/s, against 73-92 GFLOP/s for float32 in any layout.
A bfloat16 training step of SD3 at the benchmarks' `medium` size is then 90% `aten::mm` and takes ~100 s, 30x
the float32 step. Flash attention is slow too: forward + backward of one [4, 8, 333, 64] attention, 1 thread,
270 ms in bfloat16, 52 ms in float32, 61 ms for bfloat16 inputs widened to float32 and rounded back.

`use_fp32_kernels_for_bf16(model)` applies the way out to a model: every `nn.Linear` (same parameters, same state
dict, still an `nn.Linear`) widens its bfloat16 operands exactly, computes in float32 (the bfloat16 kernels sum
products in float32 too) and rounds the result to bfloat16, in the forward and for both gradients; every
attention of an MMDiT that runs the default processor gets `BF16ViaFP32AttnProcessor`, which computes bfloat16
queries, keys and values in float32 (through whichever attention backend is set) and rounds its output to bfloat16. Inputs, outputs and gradients stay bfloat16; only the kernels differ. Under
`torch.autocast("cpu", torch.bfloat16)` the inputs are first rounded to bfloat16, as autocast does. On that CPU
(ours / diffusers' SD3, same weights, median): `medium` bf16 forward 0.155, autocast forward 0.161, bf16 and
autocast training steps 0.035 (3.4-3.5 s against SD3's 97-98 s), at 64-74% of the float32 matmul peak.

Everything else (float32, float16, GPUs) runs PyTorch's own ops even on a converted model. Apply it where
`cpu_has_bf16_instructions()` is False and the model runs in bfloat16 on the CPU (training does); elsewhere the
native kernels are as fast or faster.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .models.attention import MMDiTAttention, MMDiTAttnProcessor
from .models.fused_ops import x86_bf16_instructions
from .models.hooks import register_processor_for_hooks
from .models.single_stream import SingleStreamAttention


def cpu_has_bf16_instructions() -> bool:
    """Whether PyTorch's bfloat16 kernels can use this CPU's bfloat16 instructions (AVX512-BF16 or AMX).

    True also on CPUs this cannot tell (not x86 with AVX2): there the native kernels are kept. False in a process
    held to PyTorch's AVX2 kernels (`ATEN_CPU_CAPABILITY=avx2`), as on an AVX2-only CPU."""
    return x86_bf16_instructions() is not False


def use_fp32_kernels_for_bf16(model: nn.Module) -> nn.Module:
    """Run `model`'s `nn.Linear` layers and MMDiT attentions on the float32 kernels for bfloat16 CPU tensors (see
    the module docstring). In place; returns `model`. Parameters, state dict and other dtypes and devices are
    unchanged. Layers added later (e.g. LoRA adapters) keep PyTorch's kernels unless this is applied again."""
    register_processor_for_hooks(BF16ViaFP32AttnProcessor)  # diffusers' LayerSkip then skips its attention too
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = BF16ViaFP32Linear
        elif isinstance(module, (MMDiTAttention, SingleStreamAttention)) and type(module.processor) is MMDiTAttnProcessor:
            processor = BF16ViaFP32AttnProcessor()
            processor._attention_backend = module.processor._attention_backend
            processor._parallel_config = module.processor._parallel_config
            module.set_processor(processor)
    return model


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


class BF16ViaFP32Linear(nn.Linear):
    """`nn.Linear` (same parameters, same state dict) whose bfloat16 CPU products run on the float32 kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cpu and (x.dtype == torch.bfloat16 or torch.is_autocast_enabled("cpu")):
            return self._bf16_via_fp32_kernel(x)
        return F.linear(x, self.weight, self.bias)

    def _bf16_via_fp32_kernel(self, x: torch.Tensor) -> torch.Tensor:
        autocast_bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        if not autocast_bf16 and not (x.dtype == self.weight.dtype == torch.bfloat16):
            return F.linear(x, self.weight, self.bias)  # other dtype mixes: PyTorch decides (and complains)
        bias = None if self.bias is None else self.bias.to(torch.bfloat16)
        with torch.autocast("cpu", enabled=False):
            return _BF16LinearViaFP32.apply(x.to(torch.bfloat16), self.weight.to(torch.bfloat16), bias)


class BF16ViaFP32AttnProcessor(MMDiTAttnProcessor):
    """MMDiT's default attention processor, computing bfloat16 CPU attention in float32 and rounding the result."""

    def attend(self, query, key, value, attn_mask):
        if not (query.is_cpu and query.dtype == torch.bfloat16):
            return super().attend(query, key, value, attn_mask)
        with torch.autocast("cpu", enabled=False):
            out = super().attend(query.float(), key.float(), value.float(), attn_mask)
        return out.to(torch.bfloat16)
