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
