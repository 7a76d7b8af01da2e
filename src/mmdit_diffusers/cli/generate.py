"""`mmdit-diffusers generate PROMPT`: text to a PNG, offline with the shipped Shapes pipeline by default."""

from __future__ import annotations

import argparse
import re
import sys
import time

import torch

from .common import (
    DEFAULT_PIPELINE_CALL,
    CommandError,
    image_grid,
    load_pipeline,
    resolve_model,
    sampler_settings,
    save_png,
)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmdit-diffusers generate", description=__doc__)
    parser.add_argument("prompt")
    parser.add_argument("--model", default=None, help="pipeline folder or Hub repo id (default: the shipped Shapes pipeline)")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    parser.add_argument("--negative_prompt", default=None)
    parser.add_argument("--num_images", type=positive_int, default=1, help="more than one writes a grid")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=positive_int, default=None,
                        help=f"default: {DEFAULT_PIPELINE_CALL['num_inference_steps']} for the shipped pipeline, "
                        "else the pipeline's own")
    parser.add_argument("--guidance_scale", type=float, default=None,
                        help=f"default: {DEFAULT_PIPELINE_CALL['guidance_scale']} for the shipped pipeline, "
                        "else the pipeline's own")
    parser.add_argument("--height", type=positive_int, default=None)
    parser.add_argument("--width", type=positive_int, default=None)
    parser.add_argument("--output", default=None, help="PNG path (default: outputs/<prompt>.png)")
    return parser


def default_output(prompt: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:80] or "image"
    return f"outputs/{slug}.png"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        start = time.perf_counter()
        pipe = load_pipeline(resolve_model(args.model), revision=args.revision)
        loaded = time.perf_counter()
        call = dict(num_images_per_prompt=args.num_images, generator=torch.Generator().manual_seed(args.seed),
                    negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                    **sampler_settings(args.model, args.steps, args.guidance_scale))
        try:
            images = pipe(args.prompt, **call).images
        except ValueError as err:
            raise CommandError(str(err)) from err
        done = time.perf_counter()
        path = save_png(images[0] if len(images) == 1 else image_grid(images), args.output or default_output(args.prompt))
    except CommandError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"generated {len(images)} image(s) in {done - loaded:.2f}s (load {loaded - start:.2f}s)", file=sys.stderr)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
