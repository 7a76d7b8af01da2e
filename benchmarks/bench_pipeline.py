"""Where the time of one `MMDiTPipeline` call goes.

    python benchmarks/bench_pipeline.py [--steps 28] [--repeats 5] [--json out.json]

Components are timed from inside the call: forward hooks on the text encoders and the transformer, wrappers around
`encode_prompt`, `scheduler.step`, `vae.decode` and `image_processor.postprocess` (on CUDA each timer
synchronises; on a CPU with one thread the clock is the process's CPU time, see common.use_clock). The model work is text encoders + transformer calls + VAE decode; everything else of the wall
time (tokenising, scheduler steps, guidance arithmetic, preparing latents, image post-processing, Python glue) is
the pipeline's overhead, reported as a share of the total. Median of `--repeats` calls after one warm-up.

Pipelines: the tiny test pipeline (tests/tiny_pipeline.py, 16 x 16 px, two CLIPs + T5, 28 steps, guidance 7);
the same pipeline with a medium-sized transformer (the transformer benchmark's "medium": width 512, depth 8,
64 x 64 px -> 256 image tokens; 8 steps); and the shipped `pipelines/mmdit-shapes` when that folder exists
(at the sampler settings stored in its folder, as `mmdit-diffusers generate` runs it).
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
from common import clock_name, environment, keep_freed_memory, now, sync, use_clock  # noqa: E402

PROMPT = "a red circle left of a blue square"
MODEL_PARTS = ("text encoders", "transformer", "vae decode")


class Timers:
    """Seconds per label, accumulated over one pipeline call."""

    def __init__(self, device):
        self.device = device
        self.seconds = collections.defaultdict(float)
        self.calls = collections.Counter()
        self._open = {}

    def start(self, label):
        sync(self.device)
        self._open[label] = now()

    def stop(self, label):
        sync(self.device)
        self.seconds[label] += now() - self._open.pop(label)
        self.calls[label] += 1

    def wrap(self, fn, label):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            self.start(label)
            try:
                return fn(*args, **kwargs)
            finally:
                self.stop(label)

        return wrapped

    def reset(self):
        self.seconds.clear()
        self.calls.clear()


def instrument(pipe, timers: Timers) -> None:
    for name, label in (("text_encoder", "text encoders"), ("text_encoder_2", "text encoders"),
                        ("text_encoder_3", "text encoders"), ("transformer", "transformer")):
        module = getattr(pipe, name, None)
        if module is not None:
            module.register_forward_pre_hook(lambda m, args, label=label: timers.start(label))
            module.register_forward_hook(lambda m, args, out, label=label: timers.stop(label))
    # `__call__` calls `MMDiTPipeline.encode_prompt` through the class (subclasses' differ): time its text part
    pipe._encode_text = timers.wrap(pipe._encode_text, "encode_prompt")
    pipe.scheduler.step = timers.wrap(pipe.scheduler.step, "scheduler step")
    pipe.vae.decode = timers.wrap(pipe.vae.decode, "vae decode")
    pipe.image_processor.postprocess = timers.wrap(pipe.image_processor.postprocess, "image postprocess")


def time_pipeline(pipe, label: str, device, repeats: int, **call_kwargs) -> dict:
    timers = Timers(device)
    instrument(pipe, timers)
    pipe.set_progress_bar_config(disable=True)
    runs = []
    for i in range(repeats + 1):  # the first call is the warm-up
        timers.reset()
        generator = torch.Generator(device="cpu").manual_seed(0)
        sync(device)
        t0 = now()
        pipe(PROMPT, generator=generator, **call_kwargs)
        sync(device)
        total = now() - t0
        if i:
            parts = dict(timers.seconds)
            parts["tokenise + join (encode_prompt - encoders)"] = parts.pop("encode_prompt") - parts["text encoders"]
            runs.append((total, parts, dict(timers.calls)))
    total = statistics.median(r[0] for r in runs)
    parts = {k: statistics.median(r[1][k] for r in runs) for k in runs[0][1]}
    model = sum(parts[k] for k in MODEL_PARTS)
    listed = sum(parts.values())
    parts["other (loop glue, guidance, latents, checks)"] = max(total - listed, 0.0)
    return dict(
        pipeline=label, clock=clock_name(), total_ms=total * 1e3, parts_ms={k: v * 1e3 for k, v in parts.items()},
        calls=runs[0][2], overhead_ms=(total - model) * 1e3, overhead_share=(total - model) / total,
        call_kwargs={k: v for k, v in call_kwargs.items()},
    )


def tiny_pipeline(device):
    from tiny_pipeline import tiny_mmdit_pipeline

    return tiny_mmdit_pipeline(seed=0, layout="sd3").to(device)


def tiny_pipeline_medium_transformer(device):
    """The tiny pipeline's encoders and VAE around a transformer of the benchmark's "medium" size."""
    from tiny_pipeline import CLIP_DIM, LATENT_CHANNELS, T5_DIM, T5_TOKENS, tiny_mmdit_pipeline

    from mmdit_diffusers import MMDiTTransformer2DModel

    pipe = tiny_mmdit_pipeline(seed=0, layout="sd3")
    torch.manual_seed(0)
    transformer = MMDiTTransformer2DModel(
        img_dim=LATENT_CHANNELS * 4, txt_dim=T5_DIM, img_tokens=256, txt_tokens=77 + T5_TOKENS, hidden_size=512,
        depth=8, num_heads=8, cond_dim=2 * CLIP_DIM, patch_size=2, in_channels=LATENT_CHANNELS, qk_norm="rms_norm",
    )
    with torch.no_grad():
        for p in transformer.parameters():
            p.normal_(0, 0.02)
    pipe.register_modules(transformer=transformer.eval())
    pipe.default_sample_size = transformer.sample_size
    return pipe.to(device)


def run(device, steps: int, repeats: int, log=print) -> dict:
    from mmdit_diffusers import MMDiTPipeline

    results = []
    # the medium transformer takes ~0.3 s per step on one core: 8 steps keep the section short (fixed costs
    # then weigh more, so its overhead share is, if anything, overstated)
    specs = [("tiny (16 px)", tiny_pipeline, {}),
             ("tiny + medium transformer (64 px)", tiny_pipeline_medium_transformer, dict(num_inference_steps=min(steps, 8)))]
    shipped = ROOT / "pipelines" / "mmdit-shapes"
    if (shipped / "model_index.json").exists():
        # loaded as `mmdit-diffusers generate` loads it: float32 on a CPU, bfloat16 on a GPU (it is stored in fp16)
        def shipped_pipeline(d):
            dtype = torch.float32 if d.type == "cpu" else torch.bfloat16
            return MMDiTPipeline.from_pretrained(shipped, dtype=dtype).to(d)

        specs.append(("pipelines/mmdit-shapes", shipped_pipeline, {}))  # the folder's own sampler_defaults
    else:
        log(f"pipeline {shipped.relative_to(ROOT)}: not present, skipped")
    for label, build, kwargs in specs:
        with torch.inference_mode(False):
            pipe = build(device)
        results.append(time_pipeline(pipe, label, device, repeats, **{"num_inference_steps": steps, **kwargs}))
        log(format_result(results[-1]))
    return dict(pipelines=results)


def format_result(r: dict) -> str:
    parts = "; ".join(f"{k} {v:.1f} ms ({v / r['total_ms']:.1%})" for k, v in r["parts_ms"].items())
    return (f"pipeline {r['pipeline']}: total {r['total_ms']:.1f} ms; overhead {r['overhead_ms']:.1f} ms = "
            f"{r['overhead_share']:.1%} of the total\n    {parts}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default 1)")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    keep_freed_memory()
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
        use_clock("cpu" if torch.get_num_threads() == 1 else "wall")
    result = dict(environment=environment(device), **run(device, args.steps, args.repeats, functools.partial(print, flush=True)))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
