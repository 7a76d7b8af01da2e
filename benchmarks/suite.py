"""The performance suite in one command: transformer vs diffusers' SD3 and FLUX transformers (speed, FLOP/s vs the
measured matmul peak, training memory with and without checkpointing, dropped text padding), then the pipeline's
time split; a table on stdout, everything in JSON, and the issue's targets checked at the end.

    python benchmarks/suite.py --json benchmarks/results/cpu.json        # the default cases of this device
    python benchmarks/suite.py --cases medium:bf16:train:eager --memory --padding --no-pipeline   # by hand

Options as benchmarks/bench_transformer.py (cases, --full, --fused, --threads, --memory, --padding), plus
--steps (pipeline sampler steps) and --no-pipeline. See benchmarks/README.md for what the default run covers.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_pipeline  # noqa: E402
import bench_transformer  # noqa: E402


def evaluate_targets(result: dict) -> list[tuple[str, str, str]]:
    """(target, status, evidence) for each target of the performance issue."""
    rows = {r["case"]: r for r in result["rows"]}
    out = []
    slower = [r for r in result["rows"] if r["ratio"] > 1.0]
    out.append((
        "never slower than diffusers (SD3Transformer2DModel; FluxTransformer2DModel for flux-*): ratio <= 1.00 in "
        "every measured case",
        "met" if not slower else "NOT MET",
        f"{len(rows) - len(slower)}/{len(rows)} cases <= 1.00"
        + ("; above: " + ", ".join(f"{r['case']} {r['ratio']:.3f} (p25-p75 {r['ratio_p25']:.2f}-{r['ratio_p75']:.2f})"
                                   for r in slower) if slower else ""),
    ))
    for case, what, test, fmt in (
        ("medium:bf16:train:eager", "bf16 training step at medium >= 10% faster: ratio <= 0.90",
         lambda r: r["ratio"] <= 0.90, lambda r: f"ratio {r['ratio']:.3f}"),
        ("medium:bf16:forward:eager", "bf16 forward at medium >= 80% of the measured bf16 matmul peak",
         lambda r: r["ours_peak_share"] >= 0.80, lambda r: f"{r['ours_peak_share']:.1%} ({r['ours_gflops']:.1f} GFLOP/s)"),
    ):
        r = rows.get(case)
        out.append((what, "not measured" if r is None else "met" if test(r) else "NOT MET",
                    f"{case}: " + ("-" if r is None else fmt(r))))
    if "gpu" not in result["environment"]:  # issue 20, on a CPU with bfloat16 units
        for case, limit in (("medium:bf16:forward:eager", 0.85), ("medium:bf16:train:eager", 0.85),
                            ("medium:autocast:forward:eager", 0.85), ("medium:fp32:forward:eager", 0.95),
                            ("medium:fp32:train:eager", 0.95)):
            r = rows.get(case)
            out.append((f"{case} ratio <= {limit:.2f}", "not measured" if r is None else
                        "met" if r["ratio"] <= limit else "NOT MET",
                        "-" if r is None else f"{r['ratio']:.3f} (p25-p75 {r['ratio_p25']:.3f}-{r['ratio_p75']:.3f})"))
        for case, share in (("medium:bf16:forward:eager", 0.50), ("medium:bf16:train:eager", 0.40)):
            r = rows.get(case)
            out.append((f"{case} >= {share:.0%} of the bf16 matmul peak timed in the same rounds (MFU for train)",
                        "not measured" if r is None else "met" if r["ours_peak_share"] >= share else "NOT MET",
                        "-" if r is None else f"{r['ours_peak_share']:.1%} ({r['ours_gflops']:.1f} GFLOP/s)"))
    for m in result.get("memory", []):
        if m["config"] in ("medium", "sd3-medium"):
            e = m["ours"]
            out.append((f"gradient checkpointing cuts the training step's peak activation memory >= 3x ({m['config']})",
                        "met" if e["peak_reduction"] >= 3 else "NOT MET",
                        f"peak {e['plain']['peak_mib']:.0f} -> {e['checkpointed']['peak_mib']:.0f} MiB "
                        f"({e['peak_reduction']:.1f}x); held {e['held_reduction']:.1f}x"))
    for p in result.get("pipeline", {}).get("pipelines", []):
        out.append((f"pipeline overhead <= 3% of end-to-end time ({p['pipeline']})",
                    "met" if p["overhead_share"] <= 0.03 else "NOT MET",
                    f"{p['overhead_ms']:.1f} of {p['total_ms']:.1f} ms = {p['overhead_share']:.1%}"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_transformer.add_arguments(parser)
    parser.add_argument("--steps", type=int, default=28, help="pipeline sampler steps")
    parser.add_argument("--no-pipeline", action="store_true")
    parser.add_argument("--json", default=None, help="write all numbers here")
    args = parser.parse_args()
    device = bench_transformer.setup(args)
    log = functools.partial(print, flush=True)
    started = time.perf_counter()
    result = bench_transformer.run(args, device, log)
    if not args.no_pipeline:
        result["pipeline"] = bench_pipeline.run(device, args.steps, args.repeats, log)
        bench_transformer.save_json(args.json, result)
    result["targets"] = evaluate_targets(result)
    result["suite_wall_s"] = time.perf_counter() - started
    log("\ntargets:")
    for what, status, evidence in result["targets"]:
        log(f"  [{status}] {what}: {evidence}")
    log(f"suite wall time {result['suite_wall_s']:.0f} s")
    bench_transformer.save_json(args.json, result)


if __name__ == "__main__":
    main()
