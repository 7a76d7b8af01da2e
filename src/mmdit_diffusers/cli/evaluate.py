"""`mmdit-diffusers evaluate`: generate for the Shapes prompt set and score prompt adherence per category."""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from ..shapes import evaluate, evaluation_prompts, format_table, judge
from .common import (
    DEFAULT_PIPELINE_CALL,
    CommandError,
    captioned_grid,
    load_pipeline,
    resolve_model,
    sampler_settings,
    save_png,
)
from .generate import positive_int


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmdit-diffusers evaluate", description=__doc__)
    parser.add_argument("--model", default=None, help="pipeline folder or Hub repo id (default: the shipped Shapes pipeline)")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--seed", type=int, default=0, help="seeds the prompt set and the generation")
    parser.add_argument("--limit", type=positive_int, default=None, help="score only the first N prompts")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help=f"default: {DEFAULT_PIPELINE_CALL['num_inference_steps']} for the shipped pipeline, "
                        "else the pipeline's own")
    parser.add_argument("--guidance_scale", type=float, default=None,
                        help=f"default: {DEFAULT_PIPELINE_CALL['guidance_scale']} for the shipped pipeline, "
                        "else the pipeline's own")
    parser.add_argument("--batch_size", type=positive_int, default=16)
    parser.add_argument("--grid", default="outputs/evaluate-grid.png",
                        help="PNG of 4 samples per category, each with its prompt and the scorer's verdict")
    parser.add_argument("--json", default=None, help="write the scores here")
    return parser


def grid_sample(prompts, per_category: int = 4) -> list[int]:
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        pipe = load_pipeline(resolve_model(args.model), revision=args.revision)
        prompts = evaluation_prompts(seed=args.seed)[: args.limit]
        call = sampler_settings(args.model, args.steps, args.guidance_scale)
        generator = torch.Generator().manual_seed(args.seed)
        pipe.set_progress_bar_config(disable=True)
        images, start = [], time.perf_counter()
        for i in range(0, len(prompts), args.batch_size):
            batch = [p.caption for p in prompts[i : i + args.batch_size]]
            images += pipe(batch, generator=generator, **call).images
            print(f"\r{len(images)}/{len(prompts)} images", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        seconds = time.perf_counter() - start
        results = evaluate(images, [p.caption for p in prompts])
        print(format_table(results))
        print(f"{len(prompts)} prompts in {seconds:.1f}s")
        verdicts = [(p, judge(img, p.caption)) for p, img in zip(prompts, images)]
        sample = grid_sample(prompts)
        grid = captioned_grid([images[i] for i in sample], [prompts[i].caption for i in sample],
                              ["pass" if verdicts[i][1].passed else "FAIL" for i in sample])
        print(f"grid: {save_png(grid, args.grid)}")
        if args.json:
            failures = [dict(prompt=p.caption, category=p.category, reason=v.reason) for p, v in verdicts if not v.passed]
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(dict(model=args.model, seed=args.seed, prompts=len(prompts),
                                                       scores=results, failures=failures[:50]), indent=2))
            print(f"json: {args.json}")
    except CommandError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
