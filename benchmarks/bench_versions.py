"""This checkout's MMDiTTransformer2DModel against an earlier commit's, in one process, with diffusers' model as the
yardstick both are measured by. For questions like "did the `tiny` rows regress since f9e2021?", where 1-5% must be
told from noise:

    python benchmarks/bench_versions.py f9e2021 --cases tiny:fp32:forward:eager tiny:fp32:train:eager
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        python benchmarks/bench_versions.py f9e2021 --cases tiny:fp32:forward:eager      # AVX2 kernels only

Why one process: from one process to the next, the same code's `tiny` ratio to SD3 moved between 0.81 and 0.93
(benchmarks/README.md, "AVX2 rows on another CPU"), more than the differences in question. In one process both
versions share the libraries, the allocator and the machine's slow and fast stretches.
Each round runs every model in a fresh random order, each as a block: one untimed call (the model before it has
left the caches full of its own code and data), then `--calls` timed calls, whose mean is the round's sample.
Timing single calls in a fixed rotation instead charges whichever model follows the diffusers model for the cold
caches: that made this checkout read 4% slower than itself in a first version of this script.

The revision's `src/mmdit_diffusers` comes from `git archive` and is imported as `mmdit_rev` (its package
`__init__` is not run: only the model's modules); its model is converted from the same diffusers model by its own
`from_sd3` / `from_flux`. On a CPU without bfloat16 instructions, ours runs the bf16 and autocast cases with
`cpu_bf16`'s layers, as `bench_transformer.py` gives them; so does the revision where it has that module.
Reports, per case, the median over rounds of the within-round ratios, with quartiles: this / revision,
this / diffusers, revision / diffusers.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import io
import json
import random
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_transformer  # noqa: E402
from bench_transformer import Case, add_arguments, build_pair, make_inputs, make_step, setup  # noqa: E402
from common import environment, now, quiet_diffusers, ratio_stats, sync  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def import_package(path: Path, name: str) -> types.ModuleType:
    """The package at `path` (a copy of `src/mmdit_diffusers`) importable as `name`, without running its
    `__init__` (which imports the pipelines and the command line): its submodules load on demand."""
    package = types.ModuleType(name)
    package.__path__ = [str(path)]
    package.__package__ = name
    sys.modules[name] = package
    return package


def load_revision(rev: str, into: Path, name: str = "mmdit_rev") -> types.ModuleType:
    """Revision `rev`'s `src/mmdit_diffusers`, extracted under `into` and imported as `name`."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "src/mmdit_diffusers"], capture_output=True)
    if archive.returncode != 0:
        raise SystemExit(f"revision {rev!r}: git archive failed: {archive.stderr.decode().strip()}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    return import_package(into / "src" / "mmdit_diffusers", name)


def revision_model(package: types.ModuleType, reference, flux: bool):
    """The revision's model converted from `reference` (diffusers' model) by its own converter."""
    cls = importlib.import_module(f"{package.__name__}.models.transformer_mmdit").MMDiTTransformer2DModel
    with quiet_diffusers():
        return (cls.from_flux if flux else cls.from_sd3)(reference)


def revision_bf16_layers(package: types.ModuleType, model, on: bool) -> None:
    """Give the revision's model the same bf16 path as ours (`cpu_bf16`'s layers), where the revision has one:
    `use_fp32_kernels_for_bf16(model)`, or the older module-wide flag `FP32_KERNEL_FOR_CPU_BF16`."""
    try:
        cpu_bf16 = importlib.import_module(f"{package.__name__}.cpu_bf16")
    except ImportError:
        try:
            cpu_bf16 = importlib.import_module(f"{package.__name__}.models.cpu_bf16")
        except ImportError:
            return
    if hasattr(cpu_bf16, "FP32_KERNEL_FOR_CPU_BF16"):
        cpu_bf16.FP32_KERNEL_FOR_CPU_BF16 = on
    elif on and hasattr(cpu_bf16, "use_fp32_kernels_for_bf16"):
        cpu_bf16.use_fp32_kernels_for_bf16(model)


def time_blocks(fns: dict, device, rounds: int, calls: int, seed: int = 0) -> dict[str, list[float]]:
    """Seconds per call of each function, one sample per round: the functions in a random order each round, each
    as one untimed call then `calls` timed ones (see the module docstring)."""
    samples = {key: [] for key in fns}
    keys, rng = list(fns), random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(keys)
        for key in keys:
            fns[key]()
            sync(device)
            start = now()
            for _ in range(calls):
                fns[key]()
            sync(device)
            samples[key].append((now() - start) / calls)
    return samples


def compare(case: Case, package, device, rounds: int, calls: int) -> dict:
    cfg = bench_transformer.CONFIGS[case.config]
    dtype = torch.bfloat16 if case.dtype == "bf16" else torch.float32
    autocast = case.dtype == "autocast"
    ours, reference = build_pair(case.config, device, dtype, autocast)
    rev = revision_model(package, bench_transformer.cpu_pair(case.config)[1], cfg.flux)
    with quiet_diffusers():
        rev = rev.to(device=device, dtype=dtype)
    revision_bf16_layers(package, rev, bench_transformer.FP32_KERNELS_FOR_BF16 and device.type == "cpu"
                         and (dtype == torch.bfloat16 or autocast))
    inputs = make_inputs(case.config, device, dtype)
    models = {"this": (ours, inputs["ours"]), "revision": (rev, inputs["ours"]), "diffusers": (reference, inputs["sd3"])}
    fns = {key: make_step(model, kwargs, case.pass_, autocast, device) for key, (model, kwargs) in models.items()}
    samples = time_blocks(fns, device, rounds, calls)
    row = dict(case=str(case), rounds=rounds, calls=calls, reference=type(reference).__name__,
               ms={key: 1e3 * sorted(v)[len(v) // 2] for key, v in samples.items()}, samples=samples)
    for a, b in (("this", "revision"), ("this", "diffusers"), ("revision", "diffusers")):
        row[f"{a}/{b}"] = ratio_stats(samples[a], samples[b])
    return row


def format_row(row: dict) -> str:
    ratios = "  ".join(f"{pair} {row[pair]['ratio']:.3f} ({row[pair]['ratio_p25']:.3f}-{row[pair]['ratio_p75']:.3f})"
                       for pair in ("this/revision", "this/diffusers", "revision/diffusers"))
    ms = " / ".join(f"{row['ms'][key]:.2f}" for key in ("this", "revision", "diffusers"))
    return f"{row['case']:<28} {row['rounds']:>6}  {ms:>22}  {ratios}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("revision", help="a commit, tag or branch of this repository")
    add_arguments(parser)
    parser.add_argument("--rounds", type=int, default=150, help="rounds per case (one sample per model each)")
    parser.add_argument("--calls", type=int, default=3, help="timed calls per model and round, after one untimed")
    parser.add_argument("--json", default=None, help="write all numbers here")
    args = parser.parse_args()
    if args.rounds < 5 or args.calls < 1:
        raise SystemExit(f"--rounds must be at least 5 and --calls at least 1; got {args.rounds} and {args.calls}")
    cases = args.cases or [Case.parse("tiny:fp32:forward:eager")]
    if any(case.mode != "eager" for case in cases):
        raise SystemExit("bench_versions.py times eager cases only (MODE eager)")
    device = setup(args)
    log = functools.partial(print, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        package = load_revision(args.revision, Path(tmp))
        result = dict(revision=args.revision, environment=environment(device), rows=[])
        log(f"{'case':<28} {'rounds':>6}  {'ms this / rev / diff':>22}  ratios: median over rounds (p25-p75)")
        for case in cases:
            result["rows"].append(compare(case, package, device, args.rounds, args.calls))
            log(format_row(result["rows"][-1]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
