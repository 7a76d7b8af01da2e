"""Aspect-ratio buckets (`--aspect_ratio_buckets`): train on non-square images without cropping them to squares.

A bucket is a training size `(width, height)`. Each image goes to the bucket whose aspect ratio is nearest its own
(in log ratio; ties to the earlier bucket), is resized to cover it and cropped to it (`data.image_to_tensor`). The
sampler (`data.ResumableBatchSampler`) draws every micro-batch from one bucket, so latents of different shapes never
share a batch.

`auto` picks sizes of about `resolution`^2 pixels: landscape widths on a grid of `step` (a multiple of the VAE scale
factor x patch size, about resolution/16), each with the height that keeps the area nearest resolution^2 on the
same grid, aspect ratios up to 2:1 (`AUTO_MAX_ASPECT`), and the same sizes turned upright.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections import Counter
from dataclasses import dataclass

from ..errors import InputError

logger = logging.getLogger("mmdit_diffusers.train")

AUTO_MAX_ASPECT = 2.0


@dataclass
class BucketAssignment:
    """`sizes[b]` is bucket b's `(width, height)`; `of_example[i]` the bucket of example i."""

    sizes: list[tuple[int, int]]
    of_example: list[int]


def bucket_spec(text: str) -> str | tuple[int, int]:
    """One `--aspect_ratio_buckets` value: "auto" or WIDTHxHEIGHT (e.g. 768x512)."""
    if text.strip().lower() == "auto":
        return "auto"
    parts = text.lower().replace("*", "x").split("x")
    try:
        width, height = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or WIDTHxHEIGHT (e.g. 768x512), got {text!r}") from None
    if width <= 0 or height <= 0:
        raise argparse.ArgumentTypeError(f"bucket sides must be positive, got {text!r}")
    return width, height


bucket_spec.__name__ = "bucket"


def auto_buckets(resolution: int, multiple: int) -> list[tuple[int, int]]:
    """Sizes of about resolution^2 pixels, sides multiples of `multiple`, aspect ratios within 1:2 .. 2:1,
    ordered by aspect ratio (width / height)."""
    step = multiple * max(1, round(resolution / (16 * multiple)))
    sizes = {(resolution // multiple * multiple,) * 2}
    for width in range(step, int(resolution * AUTO_MAX_ASPECT) + step, step):
        height = max(step, round(resolution * resolution / width / step) * step)
        if 1 <= width / height <= AUTO_MAX_ASPECT:  # landscape sizes, and the same turned upright
            sizes |= {(width, height), (height, width)}
    return sorted(sizes, key=lambda s: (s[0] / s[1], s[0]))


def resolve_sizes(spec: list, resolution: int, multiple: int) -> list[tuple[int, int]]:
    """The buckets of `--aspect_ratio_buckets`: "auto" alone, or the listed sizes (duplicates dropped)."""
    if "auto" in spec:
        if len(spec) > 1:
            raise InputError("--aspect_ratio_buckets: give 'auto' alone or a list of WIDTHxHEIGHT sizes, not both.")
        return auto_buckets(resolution, multiple)
    return sorted(dict.fromkeys(tuple(s) for s in spec), key=lambda s: (s[0] / s[1], s[0]))


def largest_side(spec: list | None, resolution: int) -> int:
    """An upper bound of the bucket sides (in pixels): what a transformer built from scratch must cover."""
    if not spec:
        return resolution
    if "auto" in spec:
        return 2 * resolution  # auto sizes stay below resolution * sqrt(AUTO_MAX_ASPECT) + one step
    return max(resolution, *(max(s) for s in spec))


def check_sizes(sizes: list[tuple[int, int]], scale: int, patch: int, grid_size: int | None) -> None:
    """Every bucket must give a whole number of patches and fit the position grid (`grid_size` patches a side;
    None: any size); the first that does not is named."""
    multiple = scale * patch
    for width, height in sizes:
        if width % multiple or height % multiple:
            raise InputError(
                f"--aspect_ratio_buckets {width}x{height}: sides must be multiples of the VAE scale factor x patch "
                f"size = {scale} x {patch} = {multiple}; try {max(multiple, width // multiple * multiple)}x"
                f"{max(multiple, height // multiple * multiple)}."
            )
        if grid_size is not None and max(width, height) // multiple > grid_size:
            raise InputError(
                f"--aspect_ratio_buckets {width}x{height} gives {width // scale}x{height // scale} latents "
                f"({width // multiple}x{height // multiple} patches), larger than the transformer's position grid "
                f"({grid_size}x{grid_size} patches, {grid_size * multiple} image pixels a side; "
                "`pos_embed_max_size`)."
            )


def nearest_bucket(width: int, height: int, sizes: list[tuple[int, int]]) -> int:
    ratio = math.log(width / height)
    return min(range(len(sizes)), key=lambda b: abs(math.log(sizes[b][0] / sizes[b][1]) - ratio))


def assign_buckets(source, sizes: list[tuple[int, int]]) -> BucketAssignment:
    """Each example of `source` (its `size(i)`, read from the image header) to its nearest bucket."""
    of_example = [nearest_bucket(*source.size(i), sizes) for i in range(len(source))]
    return BucketAssignment(list(sizes), of_example)


def prepare_buckets(args, source, scale: int, transformer) -> BucketAssignment | None:
    """The run's buckets (None without --aspect_ratio_buckets), checked against the transformer, every example
    assigned; logs how many examples each bucket holds."""
    if not args.aspect_ratio_buckets:
        return None
    patch = transformer.config.patch_size
    sizes = resolve_sizes(args.aspect_ratio_buckets, args.resolution, scale * patch)
    check_sizes(sizes, scale, patch, transformer.pos_grid_size)
    assignment = assign_buckets(source, sizes)
    counts = Counter(assignment.of_example)
    used = ", ".join(f"{w}x{h}: {counts[b]}" for b, (w, h) in enumerate(sizes) if counts[b])
    logger.info(f"Aspect-ratio buckets ({len(sizes)}, {len(counts)} used): {used}.")
    return assignment
