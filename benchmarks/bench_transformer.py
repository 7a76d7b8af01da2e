"""MMDiTTransformer2DModel vs diffusers' SD3Transformer2DModel: same weights, same inputs, same process.

    python benchmarks/bench_transformer.py [--configs tiny medium] [--repeats 7] [--no-compile] [--json out.json]

Every timing is the median of `--repeats` interleaved runs (A B A B ...) after warm-up, reported as the
ratio ours / theirs (< 1 is faster). FLOPs are counted analytically (see `transformer_flops`) and set
against the peak matmul throughput measured in the same run for the same dtype.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time

import diffusers
import torch
from diffusers import SD3Transformer2DModel

from mmdit_diffusers import MMDiTTransformer2DModel

CONFIGS = {
    # name: (hidden, depth, heads, latent side, patch, text tokens, batch)
    "tiny": (64, 2, 4, 16, 2, 32, 2),
    "medium": (512, 8, 8, 32, 2, 77, 4),
    "sd3-medium": (1536, 24, 24, 128, 2, 333, 2),  # GPU only
}
LATENT_CHANNELS, TXT_DIM, POOLED_DIM = 16, 4096, 2048


def build_pair(name: str, device: torch.device):
    hidden, depth, heads, side, patch, _, _ = CONFIGS[name]
    torch.manual_seed(0)
    sd3 = SD3Transformer2DModel(
        sample_size=side, patch_size=patch, in_channels=LATENT_CHANNELS, num_layers=depth,
        attention_head_dim=hidden // heads, num_attention_heads=heads, joint_attention_dim=TXT_DIM,
        caption_projection_dim=hidden, pooled_projection_dim=POOLED_DIM, out_channels=LATENT_CHANNELS,
        pos_embed_max_size=max(side // patch, 8),
    )
    with torch.no_grad():
        for p in sd3.parameters():
            p.normal_(0, 0.02)
    ours = MMDiTTransformer2DModel.from_sd3(sd3)
    return ours.to(device), sd3.to(device)


def make_inputs(name: str, device, dtype):
    _, _, _, side, _, txt, batch = CONFIGS[name]
    g = torch.Generator().manual_seed(1)
    return dict(
        hidden_states=torch.randn(batch, LATENT_CHANNELS, side, side, generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(batch, txt, TXT_DIM, generator=g).to(device, dtype),
        pooled_projections=torch.randn(batch, POOLED_DIM, generator=g).to(device, dtype),
        timestep=torch.rand(batch, generator=g).mul(1000).to(device),
    )


def transformer_flops(name: str) -> float:
    """Forward FLOPs (2 per multiply-add) of the matmuls: per block and stream, QKV 3*2ND^2, output
    projection 2ND^2, MLP 2*2N*D*4D; joint attention 2 * 2 * (N_img + N_txt)^2 * D; plus the patch and text
    embedders and the final projection. Elementwise work (norms, modulation, softmax) is not counted."""
    hidden, depth, _, side, patch, txt, batch = CONFIGS[name]
    n_img = (side // patch) ** 2
    n_all = n_img + txt
    per_block = sum(2 * n * hidden * hidden * (3 + 1 + 8) for n in (n_img, txt)) + 4 * n_all * n_all * hidden
    embed = 2 * n_img * LATENT_CHANNELS * patch * patch * hidden * 2 + 2 * txt * TXT_DIM * hidden
    return float(batch * (depth * per_block + embed))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_gemm_peak(device, dtype, size: int, repeats: int = 5) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * size**3 / statistics.median(times)


def step_fn(model, inputs, mode: str, autocast: bool, device):
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()

    def run():
        if mode == "forward":
            with torch.no_grad(), ctx:
                model(**inputs, return_dict=False)
        else:
            with ctx:
                out = model(**inputs, return_dict=False)[0]
            out.float().square().mean().backward()
            model.zero_grad(set_to_none=True)

    return run


def interleaved_median(fns: list, repeats: int, warmup: int, device) -> list[float]:
    for _ in range(warmup):
        for fn in fns:
            fn()
    samples = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            samples[i].append(time.perf_counter() - t0)
    return [statistics.median(s) for s in samples]


def saved_activation_bytes(model, inputs) -> int:
    """Peak activation memory of a training step, counted as the bytes autograd saves for backward."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**inputs, return_dict=False)[0]
    out.float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    return total


def bench_config(name, device, repeats, compile_modes, rows, peaks):
    ours32, theirs32 = build_pair(name, device)
    variants = {
        "fp32": (ours32, theirs32, torch.float32, False),
        "bf16 weights": (None, None, torch.bfloat16, False),
        "autocast bf16": (ours32, theirs32, torch.float32, True),
    }
    flops = transformer_flops(name)
    for variant, (ours, theirs, dtype, autocast) in variants.items():
        if ours is None:
            ours, theirs = build_pair(name, device)
            ours, theirs = ours.to(dtype), theirs.to(dtype)
        inputs = make_inputs(name, device, dtype)
        peak = peaks[torch.bfloat16 if (autocast or dtype == torch.bfloat16) else torch.float32]
        for compiled in compile_modes:
            a = torch.compile(ours) if compiled else ours
            b = torch.compile(theirs) if compiled else theirs
            for mode in ("forward", "forward+backward"):
                t_a, t_b = interleaved_median(
                    [step_fn(a, inputs, mode, autocast, device), step_fn(b, inputs, mode, autocast, device)],
                    repeats, warmup=2, device=device,
                )
                work = flops * (1 if mode == "forward" else 3)
                rows.append(dict(
                    config=name, dtype=variant, compile=compiled, mode=mode, ours_ms=t_a * 1e3, sd3_ms=t_b * 1e3,
                    ratio=t_a / t_b, ours_peak_share=work / t_a / peak, sd3_peak_share=work / t_b / peak,
                ))
                print_row(rows[-1], flush=True)


def bench_memory(name, device) -> dict:
    ours, theirs = build_pair(name, device)
    inputs = make_inputs(name, device, torch.float32)
    result = {"config": name}
    for label, model in (("ours", ours), ("sd3", theirs)):
        model.disable_gradient_checkpointing()
        plain = saved_activation_bytes(model, inputs)
        model.enable_gradient_checkpointing()
        ckpt = saved_activation_bytes(model, inputs)
        result[label] = dict(activations_mib=plain / 2**20, checkpointed_mib=ckpt / 2**20, reduction=plain / ckpt)
    return result


def bench_padding(name, device, repeats) -> dict:
    """Short prompts in a long padded sequence: with the mask, shared padding is dropped before the blocks."""
    ours, _ = build_pair(name, device)
    inputs = make_inputs(name, device, torch.float32)
    batch, length = inputs["encoder_hidden_states"].shape[:2]
    mask = torch.zeros(batch, length, dtype=torch.long, device=device)
    mask[:, : max(length // 8, 1)] = 1
    masked = dict(inputs, encoder_attention_mask=mask)
    with torch.no_grad():
        t_mask, t_full = interleaved_median(
            [lambda: ours(**masked), lambda: ours(**inputs)], repeats, warmup=2, device=device
        )
    return dict(config=name, real_tokens=int(mask[0].sum()), of=length, masked_ms=t_mask * 1e3,
                unmasked_ms=t_full * 1e3, speedup=t_full / t_mask)


def print_row(r, flush=False):
    print(
        f"{r['config']:<10} {r['dtype']:<14} {'compile' if r['compile'] else 'eager':<8} {r['mode']:<17} "
        f"{r['ours_ms']:>10.2f} {r['sd3_ms']:>10.2f} {r['ratio']:>7.3f} {r['ours_peak_share']:>8.1%} "
        f"{r['sd3_peak_share']:>8.1%}",
        flush=flush,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=None, choices=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--json", default=None, help="write all numbers here")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    configs = args.configs or (["tiny", "medium", "sd3-medium"] if device.type == "cuda" else ["tiny", "medium"])
    if args.repeats < 5:
        parser.error("--repeats must be at least 5 (medians of fewer runs are noise)")

    gemm = 8192 if device.type == "cuda" else 1536
    peaks = {dt: measure_gemm_peak(device, dt, gemm) for dt in (torch.float32, torch.bfloat16)}
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device: {name}; torch {torch.__version__}; diffusers {diffusers.__version__}; threads {torch.get_num_threads()}")
    print(f"measured matmul peak ({gemm}^3): fp32 {peaks[torch.float32] / 1e9:.0f} GFLOP/s, "
          f"bf16 {peaks[torch.bfloat16] / 1e9:.0f} GFLOP/s")
    print(f"{'config':<10} {'dtype':<14} {'mode':<8} {'pass':<17} {'ours ms':>10} {'sd3 ms':>10} {'ratio':>7} "
          f"{'ours/pk':>8} {'sd3/pk':>8}")

    rows: list[dict] = []
    compile_modes = [False] if args.no_compile else [False, True]
    for cfg in configs:
        bench_config(cfg, device, args.repeats, compile_modes, rows, peaks)

    memory = [bench_memory(cfg, device) for cfg in configs if cfg != "sd3-medium"]
    for m in memory:
        print(f"activation memory {m['config']}: " + "; ".join(
            f"{k} {v['activations_mib']:.1f} MiB -> {v['checkpointed_mib']:.1f} MiB with checkpointing "
            f"({v['reduction']:.1f}x)" for k, v in m.items() if k != "config"))
    padding = [bench_padding(cfg, device, args.repeats) for cfg in configs if cfg != "sd3-medium"]
    for p in padding:
        print(f"padding drop {p['config']}: {p['real_tokens']}/{p['of']} real text tokens: "
              f"{p['unmasked_ms']:.2f} ms unmasked -> {p['masked_ms']:.2f} ms masked ({p['speedup']:.2f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=name, torch=torch.__version__, diffusers=diffusers.__version__,
                           peaks_gflops={str(k): v / 1e9 for k, v in peaks.items()},
                           rows=rows, memory=memory, padding=padding), f, indent=2)


if __name__ == "__main__":
    main()
