"""The correctness checks that need a GPU (CI has none; run by hand on a device machine, before its benchmarks):
ours against diffusers' SD3 and FLUX models on CUDA with the GPU's own paths (the joint sequence concatenated
along the sequence, cuBLASLt's fc1 + GELU epilogue in half precision, PyTorch's SDPA kernels).

    PYTHONPATH=src python3 scripts/gpu_checks.py      # prints one line per check; exit status 1 if any fails

- float32: ours equals the reference to 1e-4 of the output's scale (`medium` and `flux-medium` benchmark configs,
  same weights, TF32 off);
- bfloat16 weights: ours' error against the float32 output is no larger than 1.1x the reference's own;
- the fused fc1 + GELU alone: its bfloat16 error against float32 is no larger than 1.1x the plain two kernels'.
"""

import os
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_transformer import build_pair, make_inputs  # noqa: E402

from mmdit_diffusers.models.fused_ops import linear_gelu_tanh  # noqa: E402

DEVICE = torch.device(os.environ.get("DEVICE", "cuda"))  # DEVICE=cpu: a smoke run of the script itself
FAILED = []


def check(name: str, ok: bool, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).square().mean().sqrt().item()


@torch.no_grad()
def outputs(config: str, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    ours, reference = build_pair(config, DEVICE, dtype)
    inputs = make_inputs(config, DEVICE, dtype)
    return ours(**inputs["ours"], return_dict=False)[0], reference(**inputs["sd3"], return_dict=False)[0]


def main() -> None:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    for config in ("medium", "flux-medium"):
        ours32, ref32 = outputs(config, torch.float32)
        scale = ref32.abs().max().item()
        diff = (ours32 - ref32).abs().max().item()
        check(f"{config} float32 parity", diff <= 1e-4 * scale, f"max |ours - reference| {diff:.2e}, scale {scale:.2f}")
        ours16, ref16 = outputs(config, torch.bfloat16)
        err_ours, err_ref = rms(ours16, ref32), rms(ref16, ref32)
        check(f"{config} bfloat16 error", err_ours <= 1.1 * err_ref,
              f"rms error vs float32: ours {err_ours:.3e}, reference {err_ref:.3e}")
    gen = torch.Generator().manual_seed(0)
    fc1 = nn.Linear(1536, 6144).to(DEVICE)
    x = torch.randn(2, 4096, 1536, generator=gen).to(DEVICE)
    with torch.no_grad():
        exact = F.gelu(fc1(x), approximate="tanh")
        fc1_16, x16 = fc1.to(torch.bfloat16), x.bfloat16()
        fused, plain = linear_gelu_tanh(fc1_16, x16), F.gelu(fc1_16(x16), approximate="tanh")
    err_fused, err_plain = rms(fused, exact), rms(plain, exact)
    check("fc1 + GELU epilogue", err_fused <= 1.1 * err_plain and not torch.equal(fused, plain),
          f"rms error vs float32: fused {err_fused:.3e}, plain {err_plain:.3e}")
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
