"""The benchmark scripts still run against the code they measure (they are run by hand, and a renamed method
once broke the pipeline section of a GPU run): their measuring functions on tiny models, one call each."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_pipeline  # noqa: E402


def test_the_pipeline_split_times_every_part_of_a_call():
    pipe = bench_pipeline.tiny_pipeline(torch.device("cpu"))
    result = bench_pipeline.time_pipeline(pipe, "tiny", torch.device("cpu"), repeats=1, num_inference_steps=2)
    parts = result["parts_ms"]
    for part in ("text encoders", "transformer", "scheduler step", "vae decode",
                 "tokenise + join (encode_prompt - encoders)"):
        assert part in parts, part
    assert parts["text encoders"] > 0 and parts["transformer"] > 0
    assert parts["tokenise + join (encode_prompt - encoders)"] >= 0
    assert result["calls"]["transformer"] == 2  # one batched (conditional + unconditional) call per step
    assert result["calls"]["encode_prompt"] == 1


def test_a_run_across_processes_gives_each_case_the_median_of_its_processes_and_their_range():
    import bench_transformer

    def row(case, ratio, ours_ms):
        return dict(case=case, ratio=ratio, ours_ms=ours_ms, sd3_ms=10.0, reference="SD3Transformer2DModel")

    runs = [[row("tiny:fp32:forward:eager", r, ms), row("tiny:bf16:forward:eager", r / 2, ms)]
            for r, ms in ((0.90, 9.0), (0.81, 8.1), (0.86, 8.6))]
    rows = {r["case"]: r for r in bench_transformer.across_processes(runs)}
    fp32 = rows["tiny:fp32:forward:eager"]
    assert (fp32["processes"], fp32["ratio"], fp32["ratio_min"], fp32["ratio_max"]) == (3, 0.86, 0.81, 0.90)
    assert fp32["ours_ms"] == 8.6 and rows["tiny:bf16:forward:eager"]["ratio"] == 0.43

    parser = bench_transformer.make_parser()
    args = parser.parse_args(["--processes", "3", "--cases", "tiny:fp32:forward:eager", "--repeats", "7", "--fused"])
    child = parser.parse_args(bench_transformer.child_arguments(args, "out.json"))
    assert [str(c) for c in child.cases] == ["tiny:fp32:forward:eager"] and child.repeats == 7 and child.fused
    assert child.processes == 1 and child.json == "out.json"
    assert child.memory == [] and child.padding == []  # no memory or padding sections in the processes


def test_a_revision_is_its_own_package_and_its_model_is_ours_converted_by_its_own_code():
    import bench_transformer
    import bench_versions

    from mmdit_diffusers import MMDiTTransformer2DModel

    name = "mmdit_copy_for_test"
    package = bench_versions.import_package(Path(__file__).resolve().parents[1] / "src" / "mmdit_diffusers", name)
    try:
        ours, sd3 = bench_transformer.cpu_pair("tiny")
        copy = bench_versions.revision_model(package, sd3, flux=False)
        assert type(copy).__module__ == f"{name}.models.transformer_mmdit"
        assert type(copy) is not MMDiTTransformer2DModel and isinstance(ours, MMDiTTransformer2DModel)
        inputs = bench_transformer.make_inputs("tiny", torch.device("cpu"), torch.float32)["ours"]
        with torch.no_grad():
            assert torch.equal(copy(**inputs).sample, ours(**inputs).sample)
    finally:
        for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[module]


def test_versions_are_timed_in_blocks_one_warm_call_then_the_timed_ones_in_a_new_order_each_round():
    import bench_versions

    calls = []
    fns = {key: (lambda key=key: calls.append(key)) for key in ("this", "revision", "diffusers")}
    samples = bench_versions.time_blocks(fns, torch.device("cpu"), rounds=6, calls=2)
    assert {key: len(v) for key, v in samples.items()} == {"this": 6, "revision": 6, "diffusers": 6}
    blocks = [calls[i:i + 3] for i in range(0, len(calls), 3)]
    assert len(blocks) == 18 and all(len(set(block)) == 1 for block in blocks)  # each model's calls back to back
    orders = {tuple(block[0] for block in blocks[r * 3:(r + 1) * 3]) for r in range(6)}
    assert all(sorted(order) == ["diffusers", "revision", "this"] for order in orders) and len(orders) > 1
