"""Validation images: one row per prompt, `num_validation_images` columns, saved as a PNG grid and logged
to the trackers (tensorboard `add_image`, wandb `Image`). Sampling uses its own generator seeded with the
run's seed, so it never touches the training randomness and every grid uses the same starting noise."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image


def make_grid(rows: list[list[Image.Image]], pad: int = 2) -> Image.Image:
    """Paste rows of equally sized images into one image with `pad` pixels of white between them."""
    w, h = rows[0][0].size
    cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (cols * w + (cols - 1) * pad, len(rows) * h + (len(rows) - 1) * pad), "white")
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            grid.paste(image.convert("RGB"), (j * (w + pad), i * (h + pad)))
    return grid


@torch.no_grad()
def generate_rows(pipe, prompts: list[str], num_images: int, resolution: int, num_inference_steps: int,
                  guidance_scale: float, seed: int, device, prompt_embeddings: list[dict] | None = None,
                  max_sequence_length: int | None = None) -> list[list[Image.Image]]:
    """Images for each prompt. `prompt_embeddings` (one dict of pipeline keyword arguments per prompt:
    prompt_embeds, pooled_prompt_embeds, their negatives and masks) replaces the prompts when the text
    encoders were freed after caching."""
    rows = []
    pipe.set_progress_bar_config(disable=True)
    for k, prompt in enumerate(prompts):
        generator = torch.Generator(device="cpu").manual_seed(int(seed) + k)
        kwargs = dict(height=resolution, width=resolution, num_inference_steps=num_inference_steps,
                      guidance_scale=guidance_scale, generator=generator, num_images_per_prompt=num_images,
                      output_type="pil")
        if prompt_embeddings is not None:
            kwargs.update({name: value.to(device) for name, value in prompt_embeddings[k].items()})
        else:
            kwargs["prompt"] = prompt
            if max_sequence_length is not None:
                kwargs["max_sequence_length"] = max_sequence_length
        rows.append(list(pipe(**kwargs).images))
    return rows


def save_grid(grid: Image.Image, output_dir: str, name: str) -> str:
    folder = os.path.join(output_dir, "validation")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}.png")
    tmp = path + ".tmp"
    grid.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def log_grid(accelerator, grid: Image.Image, step: int, prompts: list[str], tag: str = "validation") -> None:
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(tag, np.asarray(grid), step, dataformats="HWC")
            tracker.writer.add_text(f"{tag}/prompts", " | ".join(prompts), step)
            tracker.writer.flush()
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(grid, caption=" | ".join(prompts))]}, step=step)
