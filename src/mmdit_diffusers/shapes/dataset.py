"""Write a Shapes training set in the Hugging Face `datasets` "imagefolder" layout.

    out_dir/00000.png, 00001.png, ...
    out_dir/metadata.jsonl    one {"file_name": "00000.png", "text": caption} per line

Captions are training captions only (single, counting, relation; never a held-out relation).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..files import atomic_directory
from .render import sample_example
from .world import sample_scene


def write_dataset(
    out_dir: str | os.PathLike,
    num_images: int,
    seed: int,
    overwrite: bool = False,
    category_weights: dict[str, float] | None = None,
) -> Path:
    """Write num_images examples, deterministically for a seed; returns out_dir.

    Categories are drawn uniformly, or in proportion to `category_weights` (see world.sample_scene).

    The files are written to a staging folder beside out_dir that is renamed to out_dir at the end,
    so out_dir never holds a partial dataset. An existing out_dir is an error unless overwrite.
    """
    out_dir = Path(out_dir)
    if num_images < 1:
        raise ValueError(f"num_images must be positive, got {num_images}")
    if category_weights is not None:
        sample_scene(np.random.default_rng(0), category_weights=category_weights)  # checks the weights up front
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True to replace it")
    with atomic_directory(out_dir, replace=overwrite) as staging:
        _write_examples(staging, num_images, seed, category_weights)
    return out_dir


def _write_examples(directory: Path, num_images: int, seed: int, category_weights: dict[str, float] | None) -> None:
    rng = np.random.default_rng(seed)
    digits = max(5, len(str(num_images - 1)))
    with open(directory / "metadata.jsonl", "w", encoding="utf-8") as metadata:
        for index in range(num_images):
            image, caption = sample_example(rng, category_weights=category_weights)
            file_name = f"{index:0{digits}d}.png"
            image.save(directory / file_name, format="PNG")
            metadata.write(json.dumps({"file_name": file_name, "text": caption}) + "\n")
