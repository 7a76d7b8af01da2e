"""Pieces shared by the `generate` and `evaluate` commands: where the shipped pipeline lives, loading a
pipeline with errors a person can act on, image grids, and atomic PNG writes."""

from __future__ import annotations

import math
import os
import tempfile
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

# The embedded default: a complete pipeline folder shipped in the repository, and the sampler settings it was
# evaluated with (its model card reports the scores at these), used when no --model is given.
DEFAULT_PIPELINE = Path(__file__).resolve().parents[3] / "pipelines" / "mmdit-shapes"
DEFAULT_PIPELINE_CALL = dict(num_inference_steps=40, guidance_scale=2.0)


class CommandError(Exception):
    """A bad argument or input: the command prints `error: <message>` and exits with status 2."""


def resolve_model(model: str | None) -> str:
    """`model`, or the shipped pipeline's folder when it is None."""
    if model is not None:
        return model
    if not (DEFAULT_PIPELINE / "model_index.json").is_file():
        raise CommandError(
            f"no --model given and the shipped pipeline is missing at {DEFAULT_PIPELINE} (it lives in the source "
            "checkout); pass --model with a pipeline folder or a Hub repo id"
        )
    return str(DEFAULT_PIPELINE)


def load_pipeline(model: str, revision: str | None = None):
    """The pipeline in float32 on the CPU, or in bfloat16 on a GPU (where it is moved)."""
    import torch

    from mmdit_diffusers import MMDiTPipeline

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32

    local = Path(model)
    if local.exists() and not (local / "model_index.json").is_file():
        raise CommandError(f"--model {model}: the folder has no model_index.json, so it is not a pipeline folder")
    try:
        pipe = MMDiTPipeline.from_pretrained(model, revision=revision, dtype=dtype)
    except (OSError, ValueError) as err:
        raise CommandError(f"--model {model}: cannot load a pipeline: {err}") from err
    return pipe.to("cuda") if torch.cuda.is_available() else pipe


def sampler_settings(model: str | None, steps: int | None, guidance_scale: float | None) -> dict:
    """Pipeline call arguments: what the command line says, else the shipped pipeline's settings when it is the
    model, else nothing (the pipeline's own defaults)."""
    call = dict(DEFAULT_PIPELINE_CALL) if model is None else {}
    if steps is not None:
        call["num_inference_steps"] = steps
    if guidance_scale is not None:
        call["guidance_scale"] = guidance_scale
    return call


def image_grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    return grid


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


def save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write to a temporary file beside `path`, then rename: a reader never sees half a PNG."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise CommandError(f"--output {path}: expected a .png file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG")
        os.chmod(tmp, 0o644)  # mkstemp creates it private; the PNG is an ordinary output file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
