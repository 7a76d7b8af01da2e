"""`mmdit-diffusers generate PROMPT`: text to a PNG, offline with the shipped Shapes pipeline by default.

The PNG goes to `--output`, or to `outputs/<the prompt's words>.png`; nothing is overwritten without `--overwrite`:
an existing `--output` is an error (before the pipeline loads), and when the name made from the prompt is taken
(by an earlier run, or by another prompt with the same words: "A Red Circle!" and "a red circle") the image is
written as `...-2.png`, `...-3.png`. The path written is printed.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import unicodedata
from pathlib import Path

from ..arguments import positive_int, seed
from ..errors import InputError
from ..files import atomic_file, free_path, output_problem
from ..shapes.shipped import add_pipeline_arguments

HELP = "generate images from a prompt (default: the shipped Shapes pipeline)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmdit-diffusers generate", description=__doc__)
    parser.add_argument("prompt")
    add_pipeline_arguments(parser)
    parser.add_argument("--negative_prompt", default=None)
    parser.add_argument("--num_images", type=positive_int, default=1, help="more than one writes a grid")
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--height", type=positive_int, default=None, help="in pixels (default: the model's size)")
    parser.add_argument("--width", type=positive_int, default=None, help="in pixels (default: the model's size)")
    parser.add_argument("--output", default=None,
                        help="PNG path (default: outputs/<prompt>.png, numbered -2, -3, ... when taken)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output (or default) file")
    return parser


def default_output(prompt: str) -> str:
    """`outputs/<slug>.png`: the prompt's words (letters and digits of any script) lower-cased, joined by "-"."""
    words = re.sub(r"[\W_]+", "-", unicodedata.normalize("NFKC", prompt).lower())
    slug = words.strip("-")[:80].strip("-") or "image"
    return f"outputs/{slug}.png"


def output_path(args: argparse.Namespace) -> tuple[Path, bool]:
    """Where the PNG goes, checked before any work: (path, whether the name is the default one)."""
    if args.output is not None:
        path = Path(args.output)
        if path.suffix.lower() != ".png":
            raise InputError(f"--output {path}: expected a .png file name")
        problem = output_problem(path, args.overwrite)
        if problem:
            raise InputError(f"--output {path}: {problem}")
        return path, False
    path = Path(default_output(args.prompt))
    if not args.overwrite:
        path = free_path(path)
    problem = output_problem(path, overwrite=True)
    if problem:
        raise InputError(f"the default output {path}: {problem}; choose a place with --output")
    return path, True


def image_grid(images: list):
    """The images on a near-square grid (`ceil(sqrt(n))` columns), empty cells white."""
    import math

    from diffusers.utils import make_image_grid
    from PIL import Image

    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    blank = Image.new("RGB", images[0].size, "white")
    return make_image_grid(images + [blank] * (rows * columns - len(images)), rows=rows, cols=columns)


def save_png(image, path: str | Path, overwrite: bool = True) -> Path:
    """Write atomically: a reader never sees half a PNG (`overwrite=False`: FileExistsError if `path` exists)."""
    path = Path(path)
    with atomic_file(path, overwrite=overwrite) as f:
        image.save(f, format="PNG")
    return path


def save_output(image, path: Path, is_default: bool, overwrite: bool) -> Path:
    """Save to `path`; a default name taken meanwhile (another run) moves on to the next free number."""
    while True:
        try:
            return save_png(image, path, overwrite=overwrite)
        except FileExistsError:
            if not is_default:
                raise InputError(f"--output {path}: appeared while generating; nothing was overwritten") from None
            path = free_path(path)
        except OSError as error:
            raise InputError(f"cannot write {path}: {error.strerror or error}") from None


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    output, is_default = output_path(args)  # before the seconds (or minutes) of loading and sampling
    taken = Path(default_output(args.prompt))
    if is_default and output != taken:
        print(f"{taken} exists; writing {output} (--overwrite replaces it)", file=sys.stderr)

    import torch

    from ..shapes.shipped import call_arguments, load_pipeline, resolve_model

    pipe = load_pipeline(resolve_model(args.model), revision=args.revision, cache_interval=args.cache_interval)
    loaded = time.perf_counter()
    call = dict(num_images_per_prompt=args.num_images, generator=torch.Generator().manual_seed(args.seed),
                negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                **call_arguments(args.steps, args.guidance_scale))
    try:
        images = pipe(args.prompt, **call).images
    except ValueError as err:  # the pipeline's checks of the call (sizes, prompt lengths)
        raise InputError(str(err)) from err
    done = time.perf_counter()
    path = save_output(images[0] if len(images) == 1 else image_grid(images), output, is_default, args.overwrite)
    print(f"generated {len(images)} image(s) in {done - loaded:.2f}s (load {loaded - start:.2f}s)", file=sys.stderr)
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    from . import run_command

    return run_command("generate", argv)


if __name__ == "__main__":
    sys.exit(main())
