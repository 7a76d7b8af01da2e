"""Where the time of an SD3-Medium-sized step goes on a GPU, kernel by kernel: the evidence behind the GPU defaults.

    python3 benchmarks/bench_gpu_kernels.py --json OUT.json [--sections attention gemm model compile]

- `attention`: PyTorch's SDPA kernels (flash, cuDNN, memory-efficient, and the one the dispatcher picks) on the
  joint-attention shapes of `sd3-medium` (batch 2, 24 heads of 64, 4096 + 333 tokens) and `flux-wide` (batch 1,
  24 heads of 128, 4096 + 512), bfloat16, forward and forward + backward;
- `gemm`: the block's products as ours and SD3 run them: Q, K, V as three products or one fused; fc1 then GELU
  (tanh) as two kernels or one cuBLASLt product with a GELU epilogue (`torch._addmm_activation`);
- `model`: the whole `sd3-medium` bf16 forward and training step, ours against SD3 (same weights, interleaved),
  with the dispatcher's attention kernel and with each kernel forced for both models, plus the host time of one
  eager forward (how long Python takes to launch it, against the GPU's time);
- `profile`: the GPU kernels of one bf16 forward and training step (summed kernel time against the wall time
  above, top kernels), eager and with regional compile, ours and SD3;
- `compile`: the same after each model's blocks are compiled one by one (diffusers' `compile_repeated_blocks`).

Times are medians of interleaved rounds (benchmarks/common.py); every row is written to the JSON as it comes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).parent))
from bench_transformer import build_pair, make_inputs, make_step, repeated_blocks, transformer_flops  # noqa: E402
from common import interleave, ratio_stats, sync  # noqa: E402

KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
           "efficient": SDPBackend.EFFICIENT_ATTENTION}
SHAPES = {"sd3-medium": (2, 24, 4096 + 333, 64), "flux-wide": (1, 24, 4096 + 512, 128)}
RESULT: dict = {"rows": []}
CONFIG, TOKENS = "sd3-medium", 2 * 4096  # the model section's config; the gemm section's rows


def record(path, **row) -> None:
    RESULT["rows"].append(row)
    print(json.dumps(row), flush=True)
    if path:
        Path(path).write_text(json.dumps(RESULT, indent=2))


def kernel_context(name: str):
    return contextlib.nullcontext() if name == "default" else sdpa_kernel(KERNELS[name])


def median_ms(fn, device, repeats: int = 10, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def picked_kernel(fn) -> str:
    """Names of the attention kernels one call launches (which one the dispatcher picked)."""
    if not torch.cuda.is_available():
        return "n/a"
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages()}
    hits = sorted(n for n in names if any(w in n.lower() for w in ("flash", "cudnn", "fmha", "attention", "sdpa")))
    return "; ".join(h[:80] for h in hits[:4])


def section_attention(device, path) -> None:
    for shape_name, (b, h, s, d) in SHAPES.items():
        q, k, v = (torch.randn(b, h, s, d, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        flops = 4.0 * b * h * s * s * d
        for name in ("default", *KERNELS):
            def forward():
                with torch.no_grad(), kernel_context(name):
                    F.scaled_dot_product_attention(q, k, v)

            def train():
                with kernel_context(name):
                    out = F.scaled_dot_product_attention(q, k, v)
                out.backward(torch.ones_like(out))

            try:
                fwd, both = median_ms(forward, device), median_ms(train, device)
                kernel = picked_kernel(forward) if name == "default" else name
                record(path, section="attention", shape=shape_name, kernel=name, picked=kernel, forward_ms=fwd,
                       train_ms=both, forward_tflops=flops / fwd / 1e9, train_tflops=3.5 * flops / both / 1e9)
            except RuntimeError as err:
                record(path, section="attention", shape=shape_name, kernel=name, error=str(err).splitlines()[0][:200])


def section_gemm(device, path) -> None:
    tokens, width = TOKENS, 1536  # the image stream of sd3-medium (its text stream adds 2 x 333 rows)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(tokens, width, generator=gen).to(device, torch.bfloat16)
    w3 = [torch.randn(width, width, generator=gen).to(device, torch.bfloat16) * 0.02 for _ in range(3)]
    b3 = [torch.randn(width, generator=gen).to(device, torch.bfloat16) for _ in range(3)]
    w_qkv, b_qkv = torch.cat(w3), torch.cat(b3)
    w1 = torch.randn(4 * width, width, generator=gen).to(device, torch.bfloat16) * 0.02
    b1 = torch.randn(4 * width, generator=gen).to(device, torch.bfloat16)
    with torch.no_grad():
        cases = {
            "qkv three products": lambda: [F.linear(x, w, b) for w, b in zip(w3, b3)],
            "qkv one product": lambda: F.linear(x, w_qkv, b_qkv).chunk(3, dim=-1),
            "fc1 + gelu(tanh) two kernels": lambda: F.gelu(F.linear(x, w1, b1), approximate="tanh"),
            "fc1 + gelu cuBLASLt epilogue": lambda: torch._addmm_activation(b1, x, w1.t(), use_gelu=True),
        }
        ref = F.gelu(F.linear(x.float(), w1.float(), b1.float()), approximate="tanh")
        diffs = {
            "two kernels": (F.gelu(F.linear(x, w1, b1), approximate="tanh").float() - ref).abs().max().item(),
            "epilogue": (torch._addmm_activation(b1, x, w1.t(), use_gelu=True).float() - ref).abs().max().item(),
            "epilogue vs exact gelu": (torch._addmm_activation(b1, x, w1.t(), use_gelu=True).float()
                                       - F.gelu(F.linear(x.float(), w1.float(), b1.float()))).abs().max().item(),
        }
        for name, fn in cases.items():
            record(path, section="gemm", case=name, ms=median_ms(fn, device, repeats=20))
        record(path, section="gemm", case="fc1 gelu max |diff| to fp32 tanh-GELU", **diffs)


def time_pair(device, path, label: str, models: dict, inputs: dict, pass_: str, context, target_s: float) -> None:
    fns = []
    for name, model in models.items():
        step = make_step(model, inputs["ours" if name.startswith("ours") else "sd3"], pass_, False, device)

        def run(step=step):
            with context():
                step()
        fns.append(run)
    try:
        times, _ = interleave(fns, device, min_repeats=5, max_repeats=15, target_s=target_s, warmup=2)
    except RuntimeError as err:
        record(path, section="model", case=label, pass_=pass_, error=str(err).splitlines()[0][:200])
        return
    flops = transformer_flops(CONFIG) * (3 if pass_ == "train" else 1)
    ms = {name: 1e3 * statistics.median(t) for name, t in zip(models, times)}
    stats = {f"{name}/sd3": ratio_stats(t, times[-1]) for name, t in zip(list(models)[:-1], times)}
    record(path, section="model", case=label, pass_=pass_, ms=ms,
           tflops={n: flops / v / 1e9 for n, v in ms.items()}, ratios=stats)


def host_time(device, model, inputs) -> dict:
    """Host seconds to launch one eager forward (no synchronisation) against its full time."""
    step = make_step(model, inputs, "forward", False, device)
    for _ in range(3):
        step()
    sync(device)
    launch, total = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        step()
        launch.append(time.perf_counter() - t0)
        sync(device)
        total.append(time.perf_counter() - t0)
    return {"launch_ms": 1e3 * statistics.median(launch), "total_ms": 1e3 * statistics.median(total)}


def gpu_profile(device, step, rows: int = 12) -> dict:
    """The GPU kernels of one call (after a warm-up): their summed time, count, and the top `rows` by time."""
    for _ in range(2):
        step()
    sync(device)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        step()
        sync(device)
    kind = torch.autograd.DeviceType.CUDA if device.type == "cuda" else torch.autograd.DeviceType.CPU
    kernels = [e for e in prof.key_averages() if e.device_type == kind]
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, attr) for e in kernels) / 1e3
    top = sorted(kernels, key=lambda e: -getattr(e, attr))[:rows]
    return {"gpu_busy_ms": total, "kernels": sum(e.count for e in kernels),
            "top": [(e.key[:90], e.count, round(getattr(e, attr) / 1e3, 2)) for e in top]}


def section_profile(device, path) -> None:
    """Kernel time of one bf16 forward and training step, eager and with regional compile, ours and SD3."""
    ours, sd3 = build_pair(CONFIG, device, torch.bfloat16)
    inputs = make_inputs(CONFIG, device, torch.bfloat16)
    models = {"ours": ours, "sd3": sd3}
    for mode in ("eager", "regional"):
        if mode == "regional":
            for model in models.values():
                for block in repeated_blocks(model):
                    block.compile()
        for pass_ in ("forward", "train"):
            for name, model in models.items():
                step = make_step(model, inputs[name], pass_, False, device)
                record(path, section="profile", mode=mode, pass_=pass_, model=name, **gpu_profile(device, step))


def section_model(device, path, compile_too: bool, target_s: float) -> None:
    ours, sd3 = build_pair(CONFIG, device, torch.bfloat16)
    inputs = make_inputs(CONFIG, device, torch.bfloat16)
    record(path, section="host", ours=host_time(device, ours, inputs["ours"]),
           sd3=host_time(device, sd3, inputs["sd3"]))
    for pass_ in ("forward", "train"):
        for kernel in ("default", "cudnn", "flash"):
            time_pair(device, path, f"eager, attention {kernel}", {"ours": ours, "sd3": sd3}, inputs, pass_,
                      lambda kernel=kernel: kernel_context(kernel), target_s)
    ours.fuse_qkv_projections()
    time_pair(device, path, "eager, ours with fused QKV", {"ours": ours, "sd3": sd3}, inputs, "forward",
              contextlib.nullcontext, target_s)
    ours.unfuse_qkv_projections()
    if not compile_too:
        return
    for model in (ours, sd3):
        for block in repeated_blocks(model):
            block.compile()
    for pass_ in ("forward", "train"):
        t0 = time.perf_counter()
        time_pair(device, path, "regional compile, attention default", {"ours": ours, "sd3": sd3}, inputs, pass_,
                  contextlib.nullcontext, target_s)
        record(path, section="compile", pass_=pass_, wall_s_with_compiling=time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--sections", nargs="+", default=["attention", "gemm", "model", "compile"])
    parser.add_argument("--target-s", type=float, default=1.5)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run of the script on `tiny`, small shapes")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        global CONFIG, TOKENS
        CONFIG, TOKENS = "tiny", 64
        SHAPES.update({name: (b, h, 128, d) for name, (b, h, s, d) in SHAPES.items()})
    torch.backends.cuda.matmul.allow_tf32 = False
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "none"
    RESULT["environment"] = {"torch": torch.__version__, "gpu": gpu,
                             "date": time.strftime("%Y-%m-%d")}
    if "attention" in args.sections:
        section_attention(device, args.json)
    if "gemm" in args.sections:
        section_gemm(device, args.json)
    if "profile" in args.sections:
        section_profile(device, args.json)
    if "model" in args.sections or "compile" in args.sections:
        section_model(device, args.json, "compile" in args.sections, args.target_s)


if __name__ == "__main__":
    main()
