"""Validation images: one row per prompt, `num_validation_images` columns, saved as a PNG grid and logged
to the trackers (tensorboard `add_image`, wandb `Image`). Sampling uses its own generator seeded with the
run's seed, so it never touches the training randomness and every grid uses the same starting noise."""

from __future__ import annotations

import os

import numpy as np
import torch
from diffusers.utils import make_image_grid
from PIL import Image

from ..files import atomic_file


def grid_of_rows(rows: list[list[Image.Image]]) -> Image.Image:
    """One image: a row per prompt, its images side by side (diffusers' `make_image_grid`)."""
    return make_image_grid([image for row in rows for image in row], rows=len(rows), cols=len(rows[0]))


@torch.no_grad()
def generate_rows(pipe, prompts: list[str], num_images: int, resolution: int, num_inference_steps: int,
                  guidance_scale: float, seed: int, device, prompt_embeddings: list[dict] | None = None,
                  max_sequence_length: int | None = None, true_cfg_scale: float | None = None) -> list[list[Image.Image]]:
    """Images for each prompt. `prompt_embeddings` (one dict of pipeline keyword arguments per prompt:
    prompt_embeds, pooled_prompt_embeds, their negatives and masks) replaces the prompts when the text
    encoders were freed after caching. `true_cfg_scale` (FLUX pipelines, whose `guidance_scale` is the distilled
    guidance): classifier-free guidance against the empty prompt."""
    rows = []
    pipe.set_progress_bar_config(disable=True)
    for k, prompt in enumerate(prompts):
        generator = torch.Generator(device="cpu").manual_seed(int(seed) + k)
        kwargs = dict(height=resolution, width=resolution, num_inference_steps=num_inference_steps,
                      guidance_scale=guidance_scale, generator=generator, num_images_per_prompt=num_images,
                      output_type="pil")
        if true_cfg_scale is not None:
            kwargs["true_cfg_scale"] = true_cfg_scale
        if prompt_embeddings is not None:
            kwargs.update({name: value.to(device) for name, value in prompt_embeddings[k].items()})
        else:
            kwargs["prompt"] = prompt
            if true_cfg_scale is not None:
                kwargs["negative_prompt"] = ""
            if max_sequence_length is not None:
                kwargs["max_sequence_length"] = max_sequence_length
        rows.append(list(pipe(**kwargs).images))
    return rows


def save_grid(grid: Image.Image, output_dir: str, name: str) -> str:
    path = os.path.join(output_dir, "validation", f"{name}.png")
    with atomic_file(path) as f:
        grid.save(f, format="PNG")
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
