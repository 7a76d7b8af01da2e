"""MMDiTTransformer2DModel vs diffusers' SD3Transformer2DModel (and, for the `flux-*` configs, vs
FluxTransformer2DModel): same weights, same inputs, same process.

    python benchmarks/bench_transformer.py                       # the default cases of this device
    python benchmarks/bench_transformer.py --cases medium:bf16:train:eager medium:fp32:forward:compile
    python benchmarks/bench_transformer.py --full                # every case (hours on a 2-core CPU)
    python benchmarks/bench_transformer.py --profile medium:fp32:train:eager   # top ops, ours and SD3
    python benchmarks/bench_transformer.py --processes 6 --cases tiny:fp32:forward:eager   # 6 fresh processes

A case is CONFIG:DTYPE:PASS:MODE with
    CONFIG  tiny | medium | sd3-medium (GPU only)          SD3-style, against SD3Transformer2DModel
            flux-tiny | flux-medium | flux-wide (GPU only) FLUX-style, against FluxTransformer2DModel (see CONFIGS)
    DTYPE   fp32 | bf16 (bf16 weights and inputs) | autocast (fp32 weights, torch.autocast bf16)
    PASS    forward (no grad) | train (forward + backward of a mean-square loss, no optimizer)
    MODE    eager | compile (torch.compile of the whole model, default inductor) | regional (each transformer
            block compiled on its own, as diffusers' compile_repeated_blocks: one compilation serves every block,
            so an SD3-Medium-sized model compiles in a fraction of the time); the first call, which compiles,
            is reported separately

The SD3 (FLUX) model gets random N(0, 0.02) weights (every tensor, so no gate is zero); ours is converted from it
with `MMDiTTransformer2DModel.from_sd3` (`from_flux`). FLUX-style cases give both models the same packed latent
tokens, `img_ids` / `txt_ids` and guidance scale (the timestep as each expects it: sigma for FLUX, sigma * 1000
for ours). In rows and JSON, `sd3_*` fields hold the diffusers model's numbers, `reference` names it. On a CPU without bfloat16 instructions ours runs with
`mmdit_diffusers.cpu_bf16.use_fp32_kernels_for_bf16` applied in the bf16 and autocast cases, as training applies it (`--native-bf16`: without;
`--fp32-kernels-for-bf16`: with, on any CPU); SD3 always runs PyTorch's own kernels. Each case is timed as interleaved rounds (see `common.interleave`) and
reported as the median over rounds of the ratio ours / SD3 within a round, with its quartiles as the noise.
Throughput is the analytic FLOP count (`transformer_flops`) over the median time, as a share of the matmul peak
of the same dtype: the best square F.linear size found at the start (`common.measure_peaks`) is timed again in
every round of the case, next to the models, so that both see the same machine load.

Also: peak memory of a training step with and without gradient checkpointing (`bench_memory`) and the speed-up
from dropping shared text padding (`bench_padding`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import gc
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    dtype_name,
    environment,
    gemm_probe,
    keep_freed_memory,
    clock_name,
    interleave,
    measure_peaks,
    quiet_diffusers,
    ratio_stats,
    sync,
    timed,
    timed_both,
    use_clock,
)


@dataclasses.dataclass(frozen=True)
class Config:
    hidden: int
    depth: int  # double-stream blocks
    heads: int
    side: int  # latent side
    patch: int
    txt: int  # text tokens
    batch: int
    single: int = 0  # single-stream blocks (FLUX-style configs)
    axes: tuple[int, ...] = ()  # rotary dims per id axis (FLUX-style configs; sum = head dim)

    @property
    def img_tokens(self) -> int:
        return (self.side // self.patch) ** 2

    @property
    def flux(self) -> bool:
        return bool(self.axes)

    @property
    def pooled_dim(self) -> int:
        return FLUX_POOLED_DIM if self.flux else POOLED_DIM


CONFIGS = {
    "tiny": Config(hidden=64, depth=2, heads=4, side=16, patch=2, txt=32, batch=2),
    "medium": Config(hidden=512, depth=8, heads=8, side=32, patch=2, txt=77, batch=4),
    "sd3-medium": Config(hidden=1536, depth=24, heads=24, side=128, patch=2, txt=333, batch=2),  # GPU only
    # FLUX.1's layout (double-stream blocks, then twice as many single-stream ones; guidance embedding), smaller
    "flux-tiny": Config(hidden=64, depth=1, single=2, heads=4, side=16, patch=2, txt=32, batch=2, axes=(4, 6, 6)),
    "flux-medium": Config(hidden=512, depth=3, single=6, heads=8, side=32, patch=2, txt=128, batch=4,
                          axes=(8, 28, 28)),
    # FLUX.1's width, heads and 1024 x 1024 sequence (4096 image + 512 text tokens) with 2 + 4 of its 19 + 38 blocks
    "flux-wide": Config(hidden=3072, depth=2, single=4, heads=24, side=128, patch=2, txt=512, batch=1,
                        axes=(16, 56, 56)),  # GPU only
}
GPU_ONLY = ("sd3-medium", "flux-wide")
LATENT_CHANNELS, TXT_DIM, POOLED_DIM, FLUX_POOLED_DIM, FLUX_GUIDANCE = 16, 4096, 2048, 768, 3.5
FP32_KERNELS_FOR_BF16 = False  # ours with mmdit_diffusers.cpu_bf16 on the CPU; set by `setup`
DTYPES = {"fp32": (torch.float32, False), "bf16": (torch.bfloat16, False), "autocast": (torch.float32, True)}
PASSES = ("forward", "train")
MODES = ("eager", "compile", "regional")

# What a plain run measures. CPU: everything that fits in ~6 minutes on a loaded 2-core machine; the rest
# (bf16 training steps take ~100 s each there, and a cold inductor compile ~1 min per model and graph) by hand
# with --cases (numbers in benchmarks/README.md).
DEFAULT_CPU_CASES = [
    *(f"tiny:{d}:{p}:eager" for d in DTYPES for p in PASSES),
    "medium:fp32:forward:eager",
    "medium:fp32:train:eager",
    "medium:bf16:forward:eager",
    "medium:autocast:forward:eager",
    "medium:fp32:forward:compile",
    *(f"flux-tiny:fp32:{p}:eager" for p in PASSES),
    *(f"flux-medium:fp32:{p}:eager" for p in PASSES),
]
DEFAULT_GPU_CASES = [  # benchmarks/gpu_bench.sh runs these in parts, eager first
    *(f"{c}:{d}:{p}:eager" for c in CONFIGS for d in DTYPES for p in PASSES),
    *(f"sd3-medium:bf16:{p}:regional" for p in PASSES),
]


@dataclasses.dataclass(frozen=True)
class Case:
    config: str
    dtype: str
    pass_: str
    mode: str

    @classmethod
    def parse(cls, text: str) -> "Case":
        parts = text.split(":")
        if len(parts) != 4:
            raise argparse.ArgumentTypeError(f"case {text!r} is not CONFIG:DTYPE:PASS:MODE")
        case = cls(*parts)
        for value, allowed in zip(parts, (CONFIGS, DTYPES, PASSES, MODES)):
            if value not in allowed:
                raise argparse.ArgumentTypeError(f"case {text!r}: {value!r} is not one of {list(allowed)}")
        return case

    def __str__(self) -> str:
        return f"{self.config}:{self.dtype}:{self.pass_}:{self.mode}"


def all_cases(device) -> list[str]:
    configs = CONFIGS if device.type == "cuda" else [c for c in CONFIGS if c not in GPU_ONLY]
    modes = MODES if device.type == "cuda" else ("eager", "compile")
    return [f"{c}:{d}:{p}:{m}" for c, d, p, m in itertools.product(configs, DTYPES, PASSES, modes)]


# ---------------------------------------------------------------------------------------------------------------
# Models and inputs
# ---------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def skip_weight_init():
    """Build Linear / Conv2d layers without their random init: every weight is redrawn right after, and an
    SD3-Medium-sized model then builds in seconds instead of minutes."""
    saved = {cls: cls.reset_parameters for cls in (nn.Linear, nn.Conv2d)}
    for cls in saved:
        cls.reset_parameters = lambda self: None
    try:
        yield
    finally:
        for cls, fn in saved.items():
            cls.reset_parameters = fn


@functools.lru_cache(maxsize=None)
def cpu_pair(name: str):
    """(ours, the diffusers model) in float32 on the CPU, same weights; cached per config (the GPU run reuses the
    big one)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from mmdit_diffusers import MMDiTTransformer2DModel

    cfg = CONFIGS[name]
    with skip_weight_init():
        if cfg.flux:
            reference = FluxTransformer2DModel(
                patch_size=1, in_channels=LATENT_CHANNELS * cfg.patch**2, num_layers=cfg.depth,
                num_single_layers=cfg.single, attention_head_dim=cfg.hidden // cfg.heads,
                num_attention_heads=cfg.heads, joint_attention_dim=TXT_DIM, pooled_projection_dim=cfg.pooled_dim,
                guidance_embeds=True, axes_dims_rope=cfg.axes,
            )
        else:
            reference = SD3Transformer2DModel(
                sample_size=cfg.side, patch_size=cfg.patch, in_channels=LATENT_CHANNELS, num_layers=cfg.depth,
                attention_head_dim=cfg.hidden // cfg.heads, num_attention_heads=cfg.heads,
                joint_attention_dim=TXT_DIM, caption_projection_dim=cfg.hidden, pooled_projection_dim=POOLED_DIM,
                out_channels=LATENT_CHANNELS, pos_embed_max_size=max(cfg.side // cfg.patch, 8),
            )
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in reference.parameters():
                p.normal_(0, 0.02, generator=gen)
        ours = (MMDiTTransformer2DModel.from_flux if cfg.flux else MMDiTTransformer2DModel.from_sd3)(reference)
    return ours, reference


def build_pair(name: str, device, dtype, autocast: bool = False):
    """Fresh copies of (ours, SD3) on `device` in `dtype`; ours with `cpu_bf16`'s layers where `FP32_KERNELS_FOR_BF16`
    and it will compute in bfloat16 (bfloat16 weights or `autocast`), as training applies them."""
    from mmdit_diffusers.cpu_bf16 import use_fp32_kernels_for_bf16

    ours, sd3 = cpu_pair(name)
    with quiet_diffusers():
        ours, sd3 = (copy.deepcopy(m).to(device=device, dtype=dtype) for m in (ours, sd3))
    if FP32_KERNELS_FOR_BF16 and device.type == "cpu" and (dtype == torch.bfloat16 or autocast):
        use_fp32_kernels_for_bf16(ours)
    return ours, sd3


def make_inputs(name: str, device, dtype, txt_tokens: int | None = None) -> dict[str, dict]:
    """{"ours": forward kwargs, "sd3": the diffusers model's}: the same tensors, each in the form its model takes."""
    cfg = CONFIGS[name]
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(cfg.batch, LATENT_CHANNELS, cfg.side, cfg.side, generator=g)
    common = dict(
        encoder_hidden_states=torch.randn(cfg.batch, txt_tokens or cfg.txt, TXT_DIM, generator=g).to(device, dtype),
        pooled_projections=torch.randn(cfg.batch, cfg.pooled_dim, generator=g).to(device, dtype),
    )
    sigma = torch.rand(cfg.batch, generator=g).to(device)
    if not cfg.flux:
        same = dict(hidden_states=latents.to(device, dtype), **common, timestep=sigma * 1000)
        return {"ours": same, "sd3": same}
    from mmdit_diffusers.models.embeddings import patchify
    from mmdit_diffusers.models.rope import image_ids, text_ids

    grid = cfg.side // cfg.patch
    flux = dict(
        hidden_states=patchify(latents, cfg.patch).to(device, dtype),  # FLUX's packed tokens
        **common,
        img_ids=image_ids(grid, grid, device),
        txt_ids=text_ids(common["encoder_hidden_states"].shape[1], device),
        guidance=torch.full((cfg.batch,), FLUX_GUIDANCE, device=device),
    )
    return {"ours": dict(flux, timestep=sigma * 1000), "sd3": dict(flux, timestep=sigma)}


def transformer_flops(name: str, txt_tokens: int | None = None) -> float:
    """Forward FLOPs of one call (2 per multiply-add), matmuls only; norms, modulation, GELU and softmax are not
    counted. Per sample, with N_i image tokens, N_t text tokens, N = N_i + N_t, width D, MLP width 4D:
      blocks     each stream: Q, K, V and output projections 4 * 2 N D^2, MLP 2 * 2 N D (4D), AdaLN 2 D (6D);
                 the text stream of the last block (pre-only, SD3-style configs): Q, K, V only, AdaLN 2 D (2D);
                 joint attention: q k^T and p v, 2 * 2 N^2 D.
      single     (FLUX-style) Q, K, V 3 * 2 N D^2, MLP in 2 N D (4D), output 2 N (5D) D, AdaLN 2 D (3D),
                 attention 2 * 2 N^2 D.
      embedders  patches 2 N_i (16 p^2) D, text 2 N_t 4096 D, timestep MLP 2 (256 D + D^2), pooled MLP
                 2 (P D + D^2) (P = 2048 SD3-style, 768 FLUX-style), FLUX-style guidance MLP 2 (256 D + D^2);
                 output: AdaLN 2 D (2D) and projection 2 N_i D (16 p^2).
    A training step counts 3x the forward (backward = grad to inputs + grad to weights), the usual MFU
    convention; the flash-attention backward's recomputation of q k^T is not counted."""
    cfg = CONFIGS[name]
    d, n_i, n_t = cfg.hidden, cfg.img_tokens, txt_tokens or cfg.txt
    stream = lambda n: 4 * 2 * n * d * d + 2 * 2 * n * d * 4 * d + 2 * d * 6 * d  # noqa: E731
    attention = 4 * (n_i + n_t) ** 2 * d
    if cfg.flux:  # every double-stream block keeps its text output; then the single-stream blocks
        single = 3 * 2 * (n_i + n_t) * d * d + 2 * (n_i + n_t) * d * 4 * d + 2 * (n_i + n_t) * 5 * d * d + 2 * d * 3 * d
        blocks = cfg.depth * (stream(n_i) + stream(n_t) + attention) + cfg.single * (single + attention)
    else:
        last_txt = 3 * 2 * n_t * d * d + 2 * d * 2 * d
        blocks = cfg.depth * (stream(n_i) + attention) + (cfg.depth - 1) * stream(n_t) + last_txt
    patch_dim = LATENT_CHANNELS * cfg.patch**2
    embed = (2 * n_i * patch_dim * d + 2 * n_t * TXT_DIM * d + 2 * (256 * d + d * d) * (2 if cfg.flux else 1)
             + 2 * (cfg.pooled_dim * d + d * d))
    head = 2 * d * 2 * d + 2 * n_i * d * patch_dim
    return float(cfg.batch * (blocks + embed + head))


def repeated_blocks(model) -> list[nn.Module]:
    """The blocks `regional` mode compiles one by one: double-stream, then single-stream (FLUX-style) blocks."""
    return [*model.transformer_blocks, *getattr(model, "single_transformer_blocks", [])]


def make_step(model, inputs: dict, pass_: str, autocast: bool, device):
    ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if autocast else contextlib.nullcontext

    def forward():
        with torch.no_grad(), ctx():
            model(**inputs, return_dict=False)

    def train():
        with ctx():
            out = model(**inputs, return_dict=False)[0]
        out.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    return forward if pass_ == "forward" else train


# ---------------------------------------------------------------------------------------------------------------
# Speed
# ---------------------------------------------------------------------------------------------------------------
def run_cases(cases: list[Case], device, peaks: dict, fused: bool, min_repeats: int, target_s: float, log=print,
              rows: list | None = None, save=lambda: None):
    """Time every case; rows are appended to `rows` (and `save()` called) as they come."""
    rows = [] if rows is None else rows
    order = sorted(cases, key=lambda c: (list(CONFIGS).index(c.config), DTYPES[c.dtype][0] != torch.float32,
                                         DTYPES[c.dtype][1]))
    for (name, weight_dtype, autocast), group in itertools.groupby(order, key=lambda c: (c.config, *DTYPES[c.dtype])):
        ours, sd3 = build_pair(name, device, weight_dtype, autocast)
        models = {"ours": ours, "sd3": sd3}
        if fused:
            models["ours_fused"] = copy.deepcopy(ours)
            models["ours_fused"].fuse_qkv_projections()
        compiled = {}
        inputs = make_inputs(name, device, weight_dtype)
        inputs["ours_fused"] = inputs["ours"]
        for case in sorted(group, key=lambda c: MODES.index(c.mode)):
            if case.mode == "compile" and not compiled:
                compiled = {k: torch.compile(m) for k, m in models.items()}
            if case.mode == "regional":
                for m in models.values():
                    for block in repeated_blocks(m):
                        block.compile()  # in place; `regional` cases run after all eager ones
            runnable = compiled if case.mode == "compile" else models
            fns = [make_step(m, inputs[label], case.pass_, autocast, device) for label, m in runnable.items()]
            # the matmul peak of this dtype, timed in the same rounds: the shares of peak see the same load
            peak_dtype = "fp32" if case.dtype == "fp32" else "bf16"
            probe, probe_flops = gemm_probe(device, DTYPES[peak_dtype][0], peaks[peak_dtype]["peak_size"])
            try:
                # the first call compiles in compile modes (reported in wall time: inductor compiles in subprocesses)
                first, first_wall = zip(*(timed_both(fn, device) for fn in fns))
                if case.mode == "eager":  # the first call warms up too, and estimates a round
                    warmup, round_s = (0 if first[0] > 5 else 1 if first[0] > 0.5 else 3), sum(first)
                else:  # the first call compiled: warm up on a compiled round
                    warmup, round_s = 1, 0.0
                times, wall = interleave([*fns, probe], device, min_repeats=min_repeats, target_s=target_s,
                                         warmup=warmup, round_s=round_s)
                *samples, probe_s = times
            except torch.OutOfMemoryError as err:
                log(f"{case}: out of memory ({err})")
                continue
            probe_rate = probe_flops / statistics.median(probe_s)
            rows.append(summarise(case, dict(zip(runnable, samples)), first_wall, probe_rate, peaks["fp32"]["peak_flops"]))
            rows[-1]["wall_ratio"] = ratio_stats(wall[0], wall[1])
            rows[-1]["wall_ms"] = {k: statistics.median(w) * 1e3 for k, w in zip(runnable, wall)}
            log(format_row(rows[-1]))
            save()
        del models, compiled, ours, sd3
        torch._dynamo.reset()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def summarise(case: Case, samples: dict, first: list[float], peak: float, fp32_peak: float) -> dict:
    flops = transformer_flops(case.config) * (1 if case.pass_ == "forward" else 3)
    med = {k: statistics.median(v) for k, v in samples.items()}
    row = dict(
        case=str(case), config=case.config, dtype=case.dtype, pass_=case.pass_, mode=case.mode,
        reference="FluxTransformer2DModel" if CONFIGS[case.config].flux else "SD3Transformer2DModel",
        rounds=len(samples["ours"]), ours_ms=med["ours"] * 1e3, sd3_ms=med["sd3"] * 1e3,
        **ratio_stats(samples["ours"], samples["sd3"]),
        gflop=flops / 1e9, ours_gflops=flops / med["ours"] / 1e9, sd3_gflops=flops / med["sd3"] / 1e9,
        peak_gflops=peak / 1e9, ours_peak_share=flops / med["ours"] / peak, sd3_peak_share=flops / med["sd3"] / peak,
        # bf16 rows: against the float32 matmul peak too (the kernel ours uses for bf16 on CPUs without bf16 units)
        ours_fp32_peak_share=None if case.dtype == "fp32" else flops / med["ours"] / fp32_peak,
        first_call_s=dict(zip(samples, first)), samples_ms={k: [t * 1e3 for t in v] for k, v in samples.items()},
    )
    if "ours_fused" in samples:
        row["ours_fused_ms"] = med["ours_fused"] * 1e3
        row["fused_vs_sd3"] = ratio_stats(samples["ours_fused"], samples["sd3"])["ratio"]
        row["fused_vs_sd3_p25_p75"] = [ratio_stats(samples["ours_fused"], samples["sd3"])[k] for k in ("ratio_p25", "ratio_p75")]
        row["fused_vs_unfused"] = ratio_stats(samples["ours_fused"], samples["ours"])["ratio"]
    return row


HEADER = (f"{'case':<32} {'rounds':>6} {'ours ms':>10} {'diffusers':>10} {'ratio':>6} {'(p25-p75)':>12} "
          f"{'GFLOP/s':>8} {'peak':>7} {'ours/pk':>7} {'diff/pk':>7}   (diffusers: SD3Transformer2DModel; "
          f"FluxTransformer2DModel for flux-*)")


def format_row(r: dict) -> str:
    line = (f"{r['case']:<32} {r['rounds']:>6} {r['ours_ms']:>10.2f} {r['sd3_ms']:>10.2f} {r['ratio']:>6.3f} "
            f"({r['ratio_p25']:.3f}-{r['ratio_p75']:.3f}) {r['ours_gflops']:>8.1f} {r['peak_gflops']:>7.1f} "
            f"{r['ours_peak_share']:>7.1%} "
            f"{r['sd3_peak_share']:>7.1%}"
            + ("" if r.get("ours_fp32_peak_share") is None else f"  [ours {r['ours_fp32_peak_share']:.1%} of the fp32 peak]"))
    if r["mode"] != "eager":
        line += f"  [first call: ours {r['first_call_s']['ours']:.0f} s, sd3 {r['first_call_s']['sd3']:.0f} s]"
    if "fused_vs_sd3" in r:
        line += f"  [fused QKV: {r['ours_fused_ms']:.2f} ms, /sd3 {r['fused_vs_sd3']:.3f}, /unfused {r['fused_vs_unfused']:.3f}]"
    return line


# ---------------------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------------------
def _cpu_step_memory(forward, backward) -> tuple[int, int]:
    """(bytes held between forward and backward, peak bytes) above the start, from the CPU allocator's events."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function("bench::forward"):
            out = forward()
        backward(out)
    events = prof.profiler.kineto_results.events()
    fwd = next(e for e in events if e.name() == "bench::forward")
    fwd_end = fwd.start_ns() + fwd.duration_ns()
    live = peak = 0
    held = None
    for start, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
        if held is None and start > fwd_end:
            held = live
        live += nbytes
        peak = max(peak, live)
    return (live if held is None else held), peak


def _cuda_step_memory(forward, backward, device) -> tuple[int, int]:
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = forward()
    sync(device)
    held = torch.cuda.memory_allocated(device) - base
    backward(out)
    sync(device)
    return held, torch.cuda.max_memory_allocated(device) - base


class SavedTensorBytes:
    """Counts the bytes autograd saves for backward (saved_tensors_hooks), each storage once, weights and inputs
    excluded. Blind to what non-reentrant checkpointing keeps, so only used without checkpointing (a cross-check
    of `held`)."""

    def __init__(self, model, inputs: dict):
        tensors = itertools.chain(model.parameters(), model.buffers(), inputs.values())
        self.skip = {t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor)}
        self.seen = {}

    def pack(self, t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.skip:
            self.seen[storage.data_ptr()] = storage.nbytes()
        return t

    def wrap(self, forward):
        def counted():
            with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
                return forward()

        return counted

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def bench_memory(name: str, device, dtype) -> dict:
    """Training-step memory above what is allocated before it (weights, inputs and, pre-allocated by a first
    step, the gradients): `held` between forward and backward (activations saved for backward) and the `peak`
    over the whole step (activations + temporaries + a checkpointed block's recomputation)."""
    ours, sd3 = build_pair(name, device, dtype)
    inputs_for = make_inputs(name, device, dtype)
    result = dict(config=name, dtype=dtype_name(dtype))
    for label, model in (("ours", ours), ("sd3", sd3)):
        inputs = inputs_for[label]

        def forward():
            return model(**inputs, return_dict=False)[0]

        def backward(out):
            out.float().square().mean().backward()

        backward(forward())  # allocate the gradients once: the steps below accumulate into them
        entry = {}
        for ckpt in (False, True):
            model.enable_gradient_checkpointing() if ckpt else model.disable_gradient_checkpointing()
            saved = None if ckpt else SavedTensorBytes(model, inputs)
            step_forward = forward if ckpt else saved.wrap(forward)
            if device.type == "cuda":
                held, peak = _cuda_step_memory(step_forward, backward, device)
            else:
                held, peak = _cpu_step_memory(step_forward, backward)
            key = "checkpointed" if ckpt else "plain"
            entry[key] = dict(held_mib=held / 2**20, peak_mib=peak / 2**20)
            if saved is not None:
                entry[key]["saved_for_backward_mib"] = saved.total / 2**20
        model.zero_grad(set_to_none=True)
        entry["peak_reduction"] = entry["plain"]["peak_mib"] / entry["checkpointed"]["peak_mib"]
        entry["held_reduction"] = entry["plain"]["held_mib"] / entry["checkpointed"]["held_mib"]
        result[label] = entry
    return result


def format_memory(m: dict) -> str:
    lines = []
    for label in ("ours", "sd3"):
        e = m[label]
        lines.append(
            f"memory {m['config']} {m['dtype']} {label:<4}: peak {e['plain']['peak_mib']:8.1f} MiB -> "
            f"{e['checkpointed']['peak_mib']:8.1f} MiB with checkpointing ({e['peak_reduction']:.1f}x); held for "
            f"backward {e['plain']['held_mib']:8.1f} -> {e['checkpointed']['held_mib']:7.1f} MiB "
            f"({e['held_reduction']:.1f}x); autograd-saved {e['plain']['saved_for_backward_mib']:.1f} MiB"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Text padding
# ---------------------------------------------------------------------------------------------------------------
def bench_padding(name: str, device, dtype, min_repeats: int, target_s: float, txt_tokens=77 + 256, real=12) -> dict:
    """Short prompts in a long padded sequence (SD3's 77 CLIP + 256 T5 positions, `real` of them real in every
    prompt): with the mask, positions that are padding in every prompt are dropped before the blocks. Against
    the same masked input with dropping switched off (same output, all positions computed), and against SD3,
    which has no mask and computes every position."""
    from mmdit_diffusers.models import transformer_mmdit

    if CONFIGS[name].flux:
        raise SystemExit(f"--padding {name}: the padding section compares against SD3 configs only")
    ours, sd3 = build_pair(name, device, dtype)
    inputs = make_inputs(name, device, dtype, txt_tokens=txt_tokens)["ours"]
    mask = torch.zeros(inputs["encoder_hidden_states"].shape[:2], dtype=torch.long, device=device)
    mask[:, :real] = 1
    masked = dict(inputs, encoder_attention_mask=mask)
    keep_all = lambda txt, txt_mask, txt_ids=None: (txt, txt_mask, txt_ids)  # noqa: E731

    def no_drop():
        with mock.patch.object(transformer_mmdit, "_drop_shared_padding", keep_all):
            return ours(**masked).sample

    with torch.no_grad():
        dropped = ours(**masked).sample
        err = (dropped.float() - no_drop().float()).abs().max().item()
        fns = [lambda: ours(**masked), no_drop, lambda: sd3(**inputs)]
        (t_drop, t_keep, t_sd3), _ = interleave(fns, device, min_repeats=min_repeats, target_s=target_s)
    return dict(
        config=name, dtype=dtype_name(dtype), text_positions=txt_tokens, real_tokens=real,
        dropped_ms=statistics.median(t_drop) * 1e3, not_dropped_ms=statistics.median(t_keep) * 1e3,
        sd3_ms=statistics.median(t_sd3) * 1e3, speedup=1 / ratio_stats(t_drop, t_keep)["ratio"],
        speedup_vs_sd3=1 / ratio_stats(t_drop, t_sd3)["ratio"], rounds=len(t_drop), max_abs_difference=err,
    )


def format_padding(p: dict) -> str:
    return (f"padding {p['config']} {p['dtype']}: {p['real_tokens']} real of {p['text_positions']} text positions: "
            f"{p['not_dropped_ms']:.1f} ms without dropping -> {p['dropped_ms']:.1f} ms dropped ({p['speedup']:.2f}x; "
            f"SD3 {p['sd3_ms']:.1f} ms, {p['speedup_vs_sd3']:.2f}x); max |difference| {p['max_abs_difference']:.1e}")


# ---------------------------------------------------------------------------------------------------------------
# Profile
# ---------------------------------------------------------------------------------------------------------------
def profile_case(case: Case, device, rows: int = 15) -> str:
    """torch.profiler tables (self time, top ops) of one step of ours and of SD3, after warm-up steps."""
    from torch.profiler import ProfilerActivity, profile

    weight_dtype, autocast = DTYPES[case.dtype]
    ours, sd3 = build_pair(case.config, device, weight_dtype, autocast)
    inputs_for = make_inputs(case.config, device, weight_dtype)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    out = []
    for label, model in (("ours", ours), ("sd3", sd3)):
        if case.mode == "regional":
            for block in repeated_blocks(model):
                block.compile()
        model = torch.compile(model) if case.mode == "compile" else model
        step = make_step(model, inputs_for[label], case.pass_, autocast, device)
        for _ in range(0 if timed(step, device) > 10 else 1):  # warm-up (the timed call is one)
            step()
        with profile(activities=activities) as prof:
            step()
            sync(device)
        out.append(f"### {label}: {case} (threads {torch.get_num_threads()})\n")
        out.append(prof.key_averages().table(sort_by=sort, row_limit=rows))
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU intra-op threads (default 1 on CPU: see benchmarks/README.md)")
    parser.add_argument("--cases", nargs="+", type=Case.parse, default=None, help="CONFIG:DTYPE:PASS:MODE ...")
    parser.add_argument("--full", action="store_true", help="every case of this device")
    parser.add_argument("--fused", action="store_true", help="also time ours with fuse_qkv_projections()")
    parser.add_argument("--repeats", type=int, default=5, help="least rounds per case (>= 5)")
    parser.add_argument("--clock", choices=("auto", "cpu", "wall"), default="auto",
                        help="auto: CPU time of the process on a CPU with one thread, else wall time")
    parser.add_argument("--target-s", type=float, default=5.0, help="cheap cases get more rounds, up to this long")
    kernels = parser.add_mutually_exclusive_group()
    kernels.add_argument("--native-bf16", action="store_true",
                         help="ours with PyTorch's own bf16 kernels on the CPU (no mmdit_diffusers.cpu_bf16)")
    kernels.add_argument("--fp32-kernels-for-bf16", action="store_true",
                         help="ours with mmdit_diffusers.cpu_bf16 on the CPU even where it has bf16 instructions")
    parser.add_argument("--no-cudnn-attention", action="store_true",
                        help="keep PyTorch's SDPA off its cuDNN kernel (both models): diffusers' FluxTransformer2DModel "
                             "hits an illegal memory access in its backward at flux-wide size (torch 2.11, H200)")
    parser.add_argument("--memory", nargs="*", default=None, help="configs for the memory section")
    parser.add_argument("--padding", nargs="*", default=None, help="configs for the text-padding section")


def setup(args) -> torch.device:
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:
        raise SystemExit(f"--device {args.device!r}: expected cpu or cuda ({error})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA device here (torch.cuda.is_available() is False)")
    if args.repeats < 5:
        raise SystemExit("--repeats must be at least 5 (medians of fewer runs are noise)")
    args.malloc_keeps_freed_memory = keep_freed_memory()
    global FP32_KERNELS_FOR_BF16
    from mmdit_diffusers.cpu_bf16 import cpu_has_bf16_instructions

    FP32_KERNELS_FOR_BF16 = args.fp32_kernels_for_bf16 or (
        not args.native_bf16 and not cpu_has_bf16_instructions()
    )
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    if args.no_cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)
    clock = args.clock
    if clock == "auto":
        clock = "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"
    if clock == "cpu" and (device.type != "cpu" or torch.get_num_threads() != 1):
        raise SystemExit("--clock cpu needs the CPU device and --threads 1")
    use_clock(clock)
    return device


def save_json(path, result: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2))


def run(args, device, log=print) -> dict:
    """The transformer part of the suite; returns everything it measured, and keeps `args.json` up to date as
    it goes (a run stopped by a time limit leaves what it measured)."""
    save = lambda: save_json(args.json, result)  # noqa: E731
    started = time.perf_counter()
    result = dict(environment=environment(device))
    result["clock"] = clock_name()
    result["environment"]["malloc_keeps_freed_memory"] = getattr(args, "malloc_keeps_freed_memory", False)
    result["environment"]["fp32_kernel_for_cpu_bf16"] = FP32_KERNELS_FOR_BF16 and device.type == "cpu"
    result["environment"]["cudnn_attention"] = device.type == "cuda" and torch.backends.cuda.cudnn_sdp_enabled()
    log(f"device {result['environment'].get('gpu', result['environment']['cpu'])}; torch {torch.__version__}; "
        f"threads {torch.get_num_threads()}; clock {clock_name()}; load average {result['environment']['load_average']}"
        + "".join(f"; {k}={v}" for k, v in result["environment"]["isa_limits"].items()))
    peaks = measure_peaks(device)
    for name, p in peaks.items():
        layouts = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in p["layouts"].items())
        log(f"matmul peak {name}: {p['peak_flops'] / 1e9:.1f} GFLOP/s (F.linear {p['peak_size']}^3; by size "
            f"{ {k: round(v / 1e9, 1) for k, v in p['by_size'].items()} }); layouts at {p['layouts_at']}^3 "
            f"(GFLOP/s): {layouts}")
    result["peaks"] = peaks
    if args.cases:
        cases = args.cases
    elif args.full:
        cases = [Case.parse(c) for c in all_cases(device)]
    else:
        cases = [Case.parse(c) for c in (DEFAULT_GPU_CASES if device.type == "cuda" else DEFAULT_CPU_CASES)]
    log(HEADER)
    result["rows"] = []
    run_cases(cases, device, peaks, args.fused, args.repeats, args.target_s, log, result["rows"], save)

    default_small = ["tiny", "medium"] + (["sd3-medium"] if device.type == "cuda" else [])
    memory_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result["memory"] = []
    for name in default_small[1:] if args.memory is None else args.memory:
        result["memory"].append(bench_memory(name, device, memory_dtype))
        log(format_memory(result["memory"][-1]))
        save()
    result["padding"] = []
    for name in default_small[1:] if args.padding is None else args.padding:
        result["padding"].append(bench_padding(name, device, memory_dtype, args.repeats, args.target_s))
        log(format_padding(result["padding"][-1]))
        save()
    end_peaks = measure_peaks(device)
    for name, p in end_peaks.items():
        log(f"matmul peak {name} at the end: {p['peak_flops'] / 1e9:.1f} GFLOP/s")
    result["peaks_at_end"] = end_peaks
    result["environment"]["load_average_at_end"] = __import__("os").getloadavg()
    result["wall_s"] = time.perf_counter() - started
    save()
    return result


# ---------------------------------------------------------------------------------------------------------------
# Across processes
# ---------------------------------------------------------------------------------------------------------------
def child_arguments(args, json_path: str) -> list[str]:
    """The command-line arguments of one process of a `--processes` run: the same cases and timing, its own JSON."""
    argv = ["--cases", *map(str, args.cases or []), "--repeats", str(args.repeats), "--target-s", str(args.target_s),
            "--clock", args.clock, "--json", json_path, "--memory", "--padding"]
    if not args.cases:
        argv = argv[2:] + (["--full"] if args.full else [])
    for flag in ("device", "threads"):
        if getattr(args, flag) is not None:
            argv += [f"--{flag}", str(getattr(args, flag))]
    for flag in ("fused", "native_bf16", "fp32_kernels_for_bf16", "no_cudnn_attention"):
        if getattr(args, flag):
            argv.append("--" + flag.replace("_", "-"))
    return argv


def across_processes(runs: list[list[dict]]) -> list[dict]:
    """Each case's rows from several processes -> one row: the median of the processes' ratios (each already the
    median over its rounds) with their range, and the median times. On a `tiny` case one process's ratio can sit
    several percent from another's (0.81-0.93 for the same code on the AMX Xeon held to AVX2: where its code and
    tensors land in memory), more than one run's quartiles show; version against version, compare these."""
    by_case: dict[str, list[dict]] = {}
    for rows in runs:
        for row in rows:
            by_case.setdefault(row["case"], []).append(row)
    return [dict(case=case, processes=len(rows), ratio=statistics.median(r["ratio"] for r in rows),
                 ratio_min=min(r["ratio"] for r in rows), ratio_max=max(r["ratio"] for r in rows),
                 ratios=[r["ratio"] for r in rows], ours_ms=statistics.median(r["ours_ms"] for r in rows),
                 sd3_ms=statistics.median(r["sd3_ms"] for r in rows), reference=rows[0]["reference"])
            for case, rows in by_case.items()]


def run_processes(args, log=print) -> dict:
    """`--processes N`: this script's cases in N fresh processes, one after another; their JSONs under "runs"."""
    import subprocess
    import tempfile

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.processes):
            path = str(Path(tmp) / f"run{i}.json")
            code = subprocess.run([sys.executable, __file__, *child_arguments(args, path)]).returncode
            if code != 0:
                raise SystemExit(f"--processes: process {i + 1} of {args.processes} exited with status {code} (its "
                                 "output is above); nothing was summarised")
            runs.append(json.loads(Path(path).read_text()))
    result = dict(processes=args.processes, rows=across_processes([run["rows"] for run in runs]), runs=runs)
    log(f"{'case':<32} {'processes':>9} {'ours ms':>10} {'diffusers':>10} {'ratio':>6}  (process range)")
    for row in result["rows"]:
        log(f"{row['case']:<32} {row['processes']:>9} {row['ours_ms']:>10.2f} {row['sd3_ms']:>10.2f} "
            f"{row['ratio']:>6.3f}  ({row['ratio_min']:.3f}-{row['ratio_max']:.3f})")
    save_json(args.json, result)
    return result


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--profile", type=Case.parse, default=None, help="print top-op tables for one case")
    parser.add_argument("--json", default=None, help="write all numbers here")
    parser.add_argument("--processes", type=int, default=1,
                        help="time the cases in this many fresh processes, one after another, and report the median "
                             "of their ratios with its range (no memory or padding sections)")
    return parser


def main() -> None:
    args = make_parser().parse_args()
    if args.processes < 1:
        raise SystemExit(f"--processes must be at least 1; got {args.processes}")
    if args.processes > 1:
        if args.profile:
            raise SystemExit("--processes and --profile do not go together: a profile is one process's")
        run_processes(args, log=functools.partial(print, flush=True))
        return
    device = setup(args)
    if args.profile:
        print(profile_case(args.profile, device))
        return
    run(args, device, log=functools.partial(print, flush=True))


if __name__ == "__main__":
    main()
