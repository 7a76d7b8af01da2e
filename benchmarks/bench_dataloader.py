"""Does the training input pipeline keep up? Images per second of the data loader alone (`training.data`: an image
folder, decode, resize, centre-crop, to tensor, the resumable sampler) against a training step at the `medium`
benchmark size (bench_transformer.CONFIGS["medium"]: width 512, depth 8, 32 x 32 latents = 256 x 256 images with
the VAE's factor 8, batch 4; forward + backward + AdamW step of our transformer).

    nice python benchmarks/bench_dataloader.py --json benchmarks/results/cpu_dataloader.json

1. interleaved rounds (see `common.interleave`) of one loader batch in the main process (`--dataloader_num_workers
   0`, the cost of one core) and one training step on this device: the median over rounds of
   (loader images/s) / (step images/s) with its quartiles; > 1 means one core feeds the step;
2. the loader alone with 0, 1, 2 worker processes (wall clock, `--batches` batches after a warm-up);
3. against the GPU: the medium bf16 / fp32 training steps measured on an H200 (`results/gpu.json`, forward +
   backward, no optimizer), i.e. the images/s a loader must supply there, and how many loader cores of this
   machine that takes.

The images: `--images` JPEGs of `--source-size` px (smooth colour fields with shapes, quality 90), written to a
temporary folder, as a folder dataset (`metadata.jsonl`) is read in training.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import clock_name, environment, interleave, keep_freed_memory, ratio_stats, use_clock  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
VAE_FACTOR = 8


def write_images(root: Path, count: int, size: int) -> str:
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    lines = []
    for i in range(count):
        y, x = np.mgrid[0:size, 0:size] / size
        a, b, c = rng.uniform(0, 255, 3)
        pixels = np.stack([a * x + (255 - a) * y, b * (1 - x), c * y * x], -1).astype("uint8")
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x0, y0 = rng.integers(0, size * 3 // 4, 2)
            draw.ellipse([x0, y0, x0 + size // 5, y0 + size // 6], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        image.save(root / f"{i:04d}.jpg", quality=90)
        lines.append(json.dumps({"file_name": f"{i:04d}.jpg", "text": f"image {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return str(root)


def make_loader(folder: str, resolution: int, batch: int, workers: int):
    from mmdit_diffusers.training import data

    source = data.load_image_folder(folder)
    dataset = data.TrainDataset(source, resolution, None, None)
    sampler = data.ResumableBatchSampler(len(source), batch, seed=0, random_flip=True)
    return iter(data.make_dataloader(dataset, sampler, workers))


def make_train_step(device):
    import bench_transformer as bt

    ours, _ = bt.cpu_pair("medium")
    model = ours.to(device).train()
    inputs = bt.make_inputs("medium", device, torch.float32)["ours"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        out = model(**inputs, return_dict=False)[0]
        out.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def loader_alone(folder: str, resolution: int, batch: int, workers: int, batches: int) -> float:
    """Images per wall second of `batches` batches, after 2 batches per worker of warm-up (processes started)."""
    it = make_loader(folder, resolution, batch, workers)
    for _ in range(2 * max(1, workers)):
        next(it)
    started = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - started)


def gpu_steps() -> dict:
    """{case: images/s} of the medium training steps in results/gpu.json (forward + backward, batch 4)."""
    path = RESULTS / "gpu.json"
    if not path.exists():
        return {}
    rows = json.loads(path.read_text())["rows"]
    return {r["case"]: 4 * 1000.0 / r["ours_ms"] for r in rows if r["case"] in (
        "medium:bf16:train:eager", "medium:fp32:train:eager")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--source-size", type=int, default=512, help="side of the JPEGs on disk")
    parser.add_argument("--batches", type=int, default=24, help="batches per loader-alone measurement")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--target-s", type=float, default=30.0, help="time for the interleaved rounds")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    log = functools.partial(print, flush=True)

    import bench_transformer as bt

    device = torch.device("cpu")
    torch.set_num_threads(1)
    use_clock("cpu")  # one thread on a shared machine: CPU time leaves out waiting for a core (common.use_clock)
    cfg = bt.CONFIGS["medium"]
    resolution, batch = cfg.side * VAE_FACTOR, cfg.batch
    result = dict(environment=environment(device), clock=clock_name(), resolution=resolution, batch=batch,
                  images=args.images, source_size=args.source_size,
                  malloc_keeps_freed_memory=keep_freed_memory())
    log(f"{result['environment']['cpu']}; 1 torch thread; clock {clock_name()}; load average "
        f"{result['environment']['load_average']}; {args.images} JPEGs of {args.source_size} px -> {resolution} px, "
        f"batch {batch}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_images(Path(tmp), args.images, args.source_size)

        # 1. one core of loading vs one training step, interleaved
        it = make_loader(folder, resolution, batch, 0)
        step = make_train_step(device)
        (load_s, step_s), _ = interleave([lambda: next(it), step], device, min_repeats=5, target_s=args.target_s)
        stats = ratio_stats(step_s, load_s)  # (images/s of the loader) / (images/s of the step)
        result["interleaved"] = dict(loader_ms=statistics.median(load_s) * 1e3, step_ms=statistics.median(step_s) * 1e3,
                                     loader_images_per_s=batch / statistics.median(load_s),
                                     step_images_per_s=batch / statistics.median(step_s), rounds=len(load_s),
                                     samples_ms=dict(loader=[t * 1e3 for t in load_s], step=[t * 1e3 for t in step_s]),
                                     **stats)
        r = result["interleaved"]
        log(f"1. loader (main process) {r['loader_images_per_s']:.1f} images/s ({r['loader_ms']:.1f} ms per batch) vs "
            f"medium training step on cpu {r['step_images_per_s']:.2f} images/s ({r['step_ms']:.0f} ms): loader / step = "
            f"{r['ratio']:.1f} (p25-p75 {r['ratio_p25']:.1f}-{r['ratio_p75']:.1f}, {r['rounds']} rounds)")

        # 2. the loader alone, with worker processes
        result["loader_alone"] = {}
        for workers in args.workers:
            rate = loader_alone(folder, resolution, batch, workers, args.batches)
            result["loader_alone"][str(workers)] = rate
            log(f"2. loader alone, {workers} worker process(es): {rate:.1f} images/s (wall clock)")

    # 3. what a GPU step needs
    per_core = result["interleaved"]["loader_images_per_s"]
    result["gpu"] = {}
    for case, rate in gpu_steps().items():
        result["gpu"][case] = dict(step_images_per_s=rate, loader_cores_needed=math.ceil(rate / per_core))
        log(f"3. {case} on the H200 of results/gpu.json: {rate:.0f} images/s; at {per_core:.0f} images/s per core "
            f"the loader needs --dataloader_num_workers >= {math.ceil(rate / per_core)}")
    result["load_average_at_end"] = __import__("os").getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
