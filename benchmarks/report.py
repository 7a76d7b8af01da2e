"""Markdown tables from the suite's JSON files (what benchmarks/README.md quotes).

    python benchmarks/report.py benchmarks/results/cpu.json [more.json ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def speed_table(rows: list[dict], clock: str) -> str:
    out = [
        f"| case | rounds | ours ms | diffusers ms | ratio ours/diffusers (p25-p75) | wall-time ratio | ours GFLOP/s | "
        f"peak GFLOP/s | ours % of peak | diffusers % of peak | ours % of fp32 peak | first call (compile) |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        first = ""
        if r["mode"] != "eager":
            first = f"ours {r['first_call_s']['ours']:.0f} s, diffusers {r['first_call_s']['sd3']:.0f} s"
        wall = r.get("wall_ratio", {}).get("ratio")
        out.append(
            f"| `{r['case']}` | {r['rounds']} | {r['ours_ms']:.1f} | {r['sd3_ms']:.1f} | **{r['ratio']:.3f}** "
            f"({r['ratio_p25']:.3f}-{r['ratio_p75']:.3f}) | {'' if wall is None else f'{wall:.3f}'} | "
            f"{r['ours_gflops']:.1f} | {r['peak_gflops']:.1f} | {r['ours_peak_share']:.0%} | {r['sd3_peak_share']:.0%} "
            f"| {'' if r.get('ours_fp32_peak_share') is None else format(r['ours_fp32_peak_share'], '.0%')} | {first} |"
        )
        if "fused_vs_sd3" in r:
            lo, hi = r["fused_vs_sd3_p25_p75"]
            out.append(f"| ↳ ours with `fuse_qkv_projections()` | | {r['ours_fused_ms']:.1f} | | {r['fused_vs_sd3']:.3f} "
                       f"({lo:.3f}-{hi:.3f}); vs unfused {r['fused_vs_unfused']:.3f} | | | | | | | |")
    return "\n".join(out)


def memory_table(memory: list[dict]) -> str:
    out = ["| config | model | peak, plain | peak, checkpointed | peak cut | held for backward, plain -> checkpointed | "
           "held cut | autograd-saved (plain) |", "|---|---|---:|---:|---:|---|---:|---:|"]
    for m in memory:
        for label in ("ours", "sd3"):
            e = m[label]
            out.append(
                f"| {m['config']} {m['dtype']} | {'ours' if label == 'ours' else 'diffusers'} | {e['plain']['peak_mib']:.1f} MiB | "
                f"{e['checkpointed']['peak_mib']:.1f} MiB | **{e['peak_reduction']:.1f}x** | "
                f"{e['plain']['held_mib']:.1f} -> {e['checkpointed']['held_mib']:.1f} MiB | {e['held_reduction']:.1f}x | "
                f"{e['plain']['saved_for_backward_mib']:.1f} MiB |"
            )
    return "\n".join(out)


def padding_table(padding: list[dict]) -> str:
    out = ["| config | text positions (real) | not dropped ms | dropped ms | speed-up | SD3 ms | vs SD3 | max abs diff |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    for p in padding:
        out.append(
            f"| {p['config']} {p['dtype']} | {p['text_positions']} ({p['real_tokens']}) | {p['not_dropped_ms']:.1f} | "
            f"{p['dropped_ms']:.1f} | **{p['speedup']:.2f}x** | {p['sd3_ms']:.1f} | {p['speedup_vs_sd3']:.2f}x | "
            f"{p['max_abs_difference']:.1e} |"
        )
    return "\n".join(out)


def pipeline_table(pipelines: list[dict]) -> str:
    labels = []
    for p in pipelines:
        labels += [k for k in p["parts_ms"] if k not in labels]
    out = ["| pipeline | total ms | " + " | ".join(labels) + " | overhead |",
           "|---|---:|" + "---:|" * len(labels) + "---:|"]
    for p in pipelines:
        cells = [f"{p['parts_ms'][k]:.1f} ({p['parts_ms'][k] / p['total_ms']:.1%})" if k in p["parts_ms"] else ""
                 for k in labels]
        out.append(f"| {p['pipeline']} | {p['total_ms']:.1f} | " + " | ".join(cells)
                   + f" | **{p['overhead_share']:.1%}** ({p['overhead_ms']:.1f} ms) |")
    return "\n".join(out)


def peaks_table(peaks: dict, end: dict | None) -> str:
    out = ["| dtype | best square F.linear | at start, by size | at the end | x W^T (nt) | g W (nn) | g^T x (tn) |",
           "|---|---:|---|---:|---:|---:|---:|"]
    for name, p in peaks.items():
        sizes = ", ".join(f"{s}: {v / 1e9:.1f}" for s, v in p["by_size"].items())
        lay = p["layouts"]
        out.append(
            f"| {name} | {p['peak_flops'] / 1e9:.1f} ({p['peak_size']}^3) | {sizes} | "
            f"{'' if end is None else round(end[name]['peak_flops'] / 1e9, 1)} | "
            f"{lay['nt'] / 1e9:.1f} | {lay['nn'] / 1e9:.1f} | {lay['tn'] / 1e9:.1f} |"
        )
    return "\n".join(out)


def main() -> None:
    for path in sys.argv[1:]:
        result = json.loads(Path(path).read_text())
        env = result["environment"]
        print(f"## {path}\n")
        limits = "".join(f" ({k}={v})" for k, v in env.get("isa_limits", {}).items())
        print(f"{env['date']}; {env.get('gpu', env['cpu'])}; flags {env['cpu_flags']}{limits}; torch {env['torch']}; "
              f"diffusers {env['diffusers']}; threads {env['torch_threads']}; clock {result.get('clock', 'wall')}; "
              f"load average {[round(x, 2) for x in env['load_average']]} at the start, "
              f"{[round(x, 2) for x in env.get('load_average_at_end', [])]} at the end; "
              f"suite {result.get('suite_wall_s', result.get('wall_s', 0)):.0f} s\n")
        print("Matmul throughput, GFLOP/s (median of 7 after 2 warm-ups; layouts at "
              f"{next(iter(result['peaks'].values()))['layouts_at']}^3):\n")
        print(peaks_table(result["peaks"], result.get("peaks_at_end")) + "\n")
        if result.get("rows"):
            print(speed_table(result["rows"], result.get("clock", "wall")) + "\n")
        if result.get("memory"):
            print(memory_table(result["memory"]) + "\n")
        if result.get("padding"):
            print(padding_table(result["padding"]) + "\n")
        if result.get("pipeline"):
            print(pipeline_table(result["pipeline"]["pipelines"]) + "\n")
        if result.get("targets"):
            print("\n".join(f"- **{status}** — {what}: {evidence}" for what, status, evidence in result["targets"]) + "\n")


if __name__ == "__main__":
    main()
