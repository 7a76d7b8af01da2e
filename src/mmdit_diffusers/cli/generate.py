"""`mmdit-diffusers generate PROMPT`: text to a PNG, offline with the shipped Shapes pipeline by default."""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from ..arguments import positive_int
from ..errors import InputError
from ..files import atomic_file
from ..shapes.shipped import add_pipeline_arguments

HELP = "generate images from a prompt (default: the shipped Shapes pipeline)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmdit-diffusers generate", description=__doc__)
    parser.add_argument("prompt")
    add_pipeline_arguments(parser)
    parser.add_argument("--negative_prompt", default=None)
    parser.add_argument("--num_images", type=positive_int, default=1, help="more than one writes a grid")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--height", type=positive_int, default=None)
    parser.add_argument("--width", type=positive_int, default=None)
    parser.add_argument("--output", default=None, help="PNG path (default: outputs/<prompt>.png)")
    return parser


def default_output(prompt: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:80] or "image"
    return f"outputs/{slug}.png"


def image_grid(images: list):
    """The images on a near-square grid (`ceil(sqrt(n))` columns), empty cells white."""
    import math

    from diffusers.utils import make_image_grid
    from PIL import Image

    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    blank = Image.new("RGB", images[0].size, "white")
    return make_image_grid(images + [blank] * (rows * columns - len(images)), rows=rows, cols=columns)


def save_png(image, path: str | Path) -> Path:
    """Write atomically: a reader never sees half a PNG."""
    path = Path(path)
    with atomic_file(path) as f:
        image.save(f, format="PNG")
    return path


def run(args: argparse.Namespace) -> int:
    import torch

    from ..shapes.shipped import call_arguments, load_pipeline, resolve_model

    start = time.perf_counter()
    output = Path(args.output or default_output(args.prompt))
    if output.suffix.lower() != ".png":  # before the minutes of loading and sampling
        raise InputError(f"--output {output}: expected a .png file name")
    pipe = load_pipeline(resolve_model(args.model), revision=args.revision)
    loaded = time.perf_counter()
    call = dict(num_images_per_prompt=args.num_images, generator=torch.Generator().manual_seed(args.seed),
                negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                **call_arguments(args.steps, args.guidance_scale))
    try:
        images = pipe(args.prompt, **call).images
    except ValueError as err:  # the pipeline's checks of the call (sizes, prompt lengths)
        raise InputError(str(err)) from err
    done = time.perf_counter()
    path = save_png(images[0] if len(images) == 1 else image_grid(images), output)
    print(f"generated {len(images)} image(s) in {done - loaded:.2f}s (load {loaded - start:.2f}s)", file=sys.stderr)
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    from . import run_command

    return run_command("generate", argv)


if __name__ == "__main__":
    sys.exit(main())
