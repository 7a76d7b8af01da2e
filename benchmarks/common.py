"""Shared helpers of the benchmark suite: environment, timing, matmul peaks.

Timing rules (every script): warm-up first, then interleaved rounds (A B, then B A, ...) so that both sides see
the same machine load; >= 5 rounds; a comparison is the median over rounds of the ratio ours / theirs within the
round (< 1 is faster), with its quartiles as the noise; times are medians per side.
On CUDA every timed call ends with `torch.cuda.synchronize()`.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse: serve blocks up to 32 MiB from the heap (not a fresh
    mmap each time) and never trim the heap. Without this, alternating two models in one process makes glibc
    return memory to the kernel and fault it back in: 20-45k minor page faults (80-180 MB of pages zeroed) per
    `medium` forward, a cost that depends on what the *other* model allocated last and was measured at up to
    ~8% of a call (neither model faults at all when it runs alone). Returns whether the settings took."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 32 * 2**20)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def percentile(values, q: float) -> float:
    values = sorted(values)
    pos = (len(values) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


_CLOCK = {"name": "wall"}


def use_clock(name: str) -> None:
    """"wall": time.perf_counter. "cpu": time.process_time, the CPU time of this process: with one intra-op
    thread on a shared machine it leaves out the time the thread waits for a core, which is most of the noise
    of wall time there (see benchmarks/README.md). Never "cpu" on a GPU, whose work the CPU only waits for."""
    if name not in ("wall", "cpu"):
        raise ValueError(name)
    _CLOCK["name"] = name


def clock_name() -> str:
    return _CLOCK["name"]


def now() -> float:
    return time.process_time() if _CLOCK["name"] == "cpu" else time.perf_counter()


def timed(fn, device) -> float:
    """Seconds of one call on the current clock (`use_clock`)."""
    sync(device)
    t0 = now()
    fn()
    sync(device)
    return now() - t0


def timed_both(fn, device) -> tuple[float, float]:
    """(seconds on the current clock, wall seconds) of one call."""
    sync(device)
    t0, w0 = now(), time.perf_counter()
    fn()
    sync(device)
    return now() - t0, time.perf_counter() - w0


def interleave(fns, device, min_repeats: int = 5, max_repeats: int = 25, target_s: float = 5.0, warmup: int = 1,
               round_s: float = 0.0):
    """Warm up, then time the functions in alternating order (A B, B A, ...) for as many rounds as fit in
    `target_s` (at least `min_repeats`, at most `max_repeats`; `round_s` estimates a round when `warmup` is 0).
    Returns (seconds on the current clock, wall seconds): one list per function each."""
    for _ in range(warmup):
        round_s = sum(timed(fn, device) for fn in fns)
    repeats = max(min_repeats, min(max_repeats, int(target_s / max(round_s, 1e-9))))
    samples, wall = [[] for _ in fns], [[] for _ in fns]
    for r in range(repeats):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            t, w = timed_both(fns[i], device)
            samples[i].append(t)
            wall[i].append(w)
    return samples, wall


def ratio_stats(a: list[float], b: list[float]) -> dict:
    """`ratio`: the median of the per-round ratios a_i / b_i (each round times both sides back to back, so load
    drift between rounds cancels), with its quartiles; `ratio_of_medians` for reference."""
    per_round = [x / y for x, y in zip(a, b)]
    return dict(
        ratio=statistics.median(per_round),
        ratio_p25=percentile(per_round, 0.25),
        ratio_p75=percentile(per_round, 0.75),
        ratio_of_medians=statistics.median(a) / statistics.median(b),
    )


# ---------------------------------------------------------------------------------------------------------------
# Matmul peaks
# ---------------------------------------------------------------------------------------------------------------
def gemm_rate(device, dtype, m: int, k: int, n: int, layout: str = "nt", repeats: int = 7, warmup: int = 2) -> float:
    """FLOP/s of one [m, k] x [k, n] product, median of `repeats` after `warmup`.

    layout "nt": F.linear(x, W) = x @ W^T with W [n, k] row-major: what nn.Linear's forward runs.
    layout "nn": g @ W with both row-major: nn.Linear's backward to its input.
    layout "tn": g^T @ x: nn.Linear's backward to its weight.
    """
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(k if layout == "tn" else m, m if layout == "tn" else k, generator=gen).to(device, dtype)
    b = torch.randn(n if layout == "nt" else k, k if layout == "nt" else n, generator=gen).to(device, dtype)
    run = {"nt": lambda: F.linear(a, b), "nn": lambda: a @ b, "tn": lambda: a.t() @ b}[layout]
    for _ in range(warmup):
        run()
    times = [timed(run, device) for _ in range(repeats)]
    return 2.0 * m * k * n / statistics.median(times)


def gemm_probe(device, dtype, size: int):
    """A square F.linear product to time alongside a model (same rounds, same load): (function, FLOPs)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    a, b = (torch.randn(size, size, generator=gen).to(device, dtype) for _ in range(2))
    return (lambda: F.linear(a, b)), 2.0 * size**3


def peak_sizes(device, dtype) -> list[int]:
    if device.type == "cuda":
        return [4096, 8192, 16384] if dtype != torch.float32 else [4096, 8192]
    # CPU bf16 without native bf16 instructions runs at ~10 GFLOP/s: 2048^3 would take seconds per call
    return [512, 1024, 2048] if dtype == torch.float32 else [512, 1024]


def measure_peaks(device, dtypes=(torch.float32, torch.bfloat16)) -> dict:
    """The best median throughput of square F.linear products (nn.Linear's forward layout) over a few sizes,
    per dtype; plus the three layouts of a training step at one size, as a diagnostic."""
    out = {}
    for dtype in dtypes:
        rates = {size: gemm_rate(device, dtype, size, size, size) for size in peak_sizes(device, dtype)}
        best = max(rates, key=rates.get)
        diag = 8192 if device.type == "cuda" else 512
        layouts = {lay: gemm_rate(device, dtype, diag, diag, diag, lay, repeats=3, warmup=1) for lay in ("nt", "nn", "tn")}
        out[dtype_name(dtype)] = dict(
            peak_flops=rates[best], peak_size=best, by_size={str(s): r for s, r in rates.items()},
            layouts_at=diag, layouts=layouts,
        )
    return out


def dtype_name(dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


# ---------------------------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The instruction sets that decide bf16 matmul speed on x86."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split(":", 1)[1].split()
    except (OSError, StopIteration):
        return []
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return [w for w in wanted if w in flags]


# Environment variables that hold PyTorch's, oneDNN's and MKL's kernels below what the CPU has (the AVX2 rows on a
# newer CPU: benchmarks/README.md)
ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def environment(device: torch.device) -> dict:
    import diffusers

    env = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        cpu=cpu_model(), cpu_flags=cpu_flags(), cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
        torch=torch.__version__, diffusers=diffusers.__version__, python=platform.python_version(),
        device=str(device), load_average=os.getloadavg(), torch_cpu_capability=torch.backends.cpu.get_cpu_capability(),
        isa_limits={k: os.environ[k] for k in ISA_LIMITS if k in os.environ},
    )
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return env


@contextlib.contextmanager
def quiet_diffusers():
    """diffusers warns on every `.to(bfloat16)` of a model; the benchmarks do it on purpose."""
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)
