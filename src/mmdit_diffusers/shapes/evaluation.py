"""Scoring a pipeline on the Shapes prompt set (`mmdit-diffusers evaluate`): generation in batches, the scorer's
table per category, a picture of samples with their verdicts, and the scores as JSON."""

from __future__ import annotations

import json
import math
import random
import sys
import textwrap
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from ..errors import InputError
from ..files import atomic_file
from .prompts import EvalPrompt, evaluation_prompts
from .scorer import evaluate, format_table, judge
from .shipped import call_arguments, load_pipeline, resolve_model


def grid_sample(prompts: list[EvalPrompt], per_category: int = 4) -> list[int]:
    """Indices of `per_category` distinct prompts of each category, a fixed random choice."""
    picks = []
    for category in dict.fromkeys(p.category for p in prompts):
        first = {}
        for i, p in enumerate(prompts):
            if p.category == category:
                first.setdefault(p.caption, i)
        distinct = list(first.values())
        picks += sorted(random.Random(0).sample(distinct, min(per_category, len(distinct))))
    return picks


def captioned_grid(images: list[Image.Image], captions: list[str], marks: list[str], columns: int = 4,
                   scale: int = 2) -> Image.Image:
    """A grid of `images` (enlarged `scale` times, nearest neighbour) with each caption and a mark under it."""
    font = ImageFont.load_default()
    w, h = images[0].width * scale, images[0].height * scale
    cell_w, text_h = max(w, 168), 30
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * cell_w, rows * (h + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, caption, mark) in enumerate(zip(images, captions, marks)):
        x, y = (i % columns) * cell_w, (i // columns) * (h + text_h)
        grid.paste(image.resize((w, h), Image.NEAREST), (x + (cell_w - w) // 2, y))
        draw.multiline_text((x + 4, y + h + 2), f"{mark} " + textwrap.fill(caption, 26), fill="black", font=font)
    return grid


def sample_batches(pipe, prompts: list[EvalPrompt], seed: int = 0, batch_size: int = 16, **call):
    """The pipeline's images for `prompts`, one list per batch of `batch_size` prompts, drawn as `evaluate` scores
    them: one generator, seeded with `seed`, across the batches. `call`: further pipeline arguments."""
    generator = torch.Generator().manual_seed(seed)
    for i in range(0, len(prompts), batch_size):
        yield pipe([p.caption for p in prompts[i : i + batch_size]], generator=generator, **call).images


def evaluate_pipeline(model: str | None = None, revision: str | None = None, seed: int = 0, limit: int | None = None,
                      steps: int | None = None, guidance_scale: float | None = None, batch_size: int = 16,
                      grid: str | Path | None = "outputs/evaluate-grid.png", json_path: str | Path | None = None,
                      overwrite: bool = True, cache_interval: int | None = None) -> dict:
    """Generate for the seeded prompt set (the first `limit` prompts), print the table per category and return
    the scores; `model` None is the shipped pipeline. Sampler settings not given come from the folder;
    `cache_interval`: the transformer's `CleanImageCacheConfig` (see `load_pipeline`). The scores go to `json_path`
    first, then the picture to `grid`; `overwrite=False` leaves existing files alone (FileExistsError)."""
    pipe = load_pipeline(resolve_model(model), revision=revision, cache_interval=cache_interval)
    prompts = evaluation_prompts(seed=seed)[:limit]
    pipe.set_progress_bar_config(disable=True)
    images, start = [], time.perf_counter()
    try:
        for batch in sample_batches(pipe, prompts, seed, batch_size, **call_arguments(steps, guidance_scale)):
            images += batch
            print(f"\r{len(images)}/{len(prompts)} images", end="", file=sys.stderr, flush=True)
    except ValueError as err:  # the pipeline's checks of the call (steps, guidance, sizes), before any step
        raise InputError(str(err)) from err
    print(file=sys.stderr)
    seconds = time.perf_counter() - start
    results = evaluate(images, [p.caption for p in prompts])
    print(format_table(results))
    print(f"{len(prompts)} prompts in {seconds:.1f}s")
    verdicts = [(p, judge(img, p.caption)) for p, img in zip(prompts, images)]
    if json_path:
        failures = [dict(prompt=p.caption, category=p.category, reason=v.reason) for p, v in verdicts if not v.passed]
        with atomic_file(json_path, "w", encoding="utf-8", overwrite=overwrite) as f:
            f.write(json.dumps(dict(model=model, seed=seed, prompts=len(prompts), scores=results,
                                    failures=failures[:50]), indent=2))
        print(f"json: {json_path}")
    if grid:
        sample = grid_sample(prompts)
        picture = captioned_grid([images[i] for i in sample], [prompts[i].caption for i in sample],
                                 ["pass" if verdicts[i][1].passed else "FAIL" for i in sample])
        with atomic_file(grid, overwrite=overwrite) as f:
            picture.save(f, format="PNG")
        print(f"grid: {grid}")
    return results
