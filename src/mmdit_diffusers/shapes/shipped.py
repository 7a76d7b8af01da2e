"""The shipped Shapes pipeline: where it is, the sampler settings it was evaluated with, and how the commands
(`generate`, `evaluate`, `probe`) load a pipeline.

The folder ships inside the package as package data (`mmdit_diffusers/shapes/mmdit-shapes`; in the source checkout
a link to `pipelines/mmdit-shapes/`), so an installed wheel finds it exactly as the checkout does. Its model card
(README.md) reports the scores at `SAMPLER_SETTINGS`, the settings used when no --model is given.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import InputError

SHIPPED_PIPELINE = Path(str(resources.files(__package__).joinpath("mmdit-shapes")))
SAMPLER_SETTINGS = dict(num_inference_steps=40, guidance_scale=2.0)


def resolve_model(model: str | None) -> str:
    """`model`, or the shipped pipeline's folder when it is None."""
    if model is not None:
        return model
    if not (SHIPPED_PIPELINE / "model_index.json").is_file():
        raise InputError(f"no --model given and the shipped pipeline is missing at {SHIPPED_PIPELINE}; pass --model "
                         "with a pipeline folder or a Hub repo id")
    return str(SHIPPED_PIPELINE)


def sampler_settings(model: str | None, steps: int | None = None, guidance_scale: float | None = None) -> dict:
    """Pipeline call arguments: what the command line says, else the shipped pipeline's settings when it is the
    model (`model` is None), else nothing (the pipeline's own defaults)."""
    call = dict(SAMPLER_SETTINGS) if model is None else {}
    if steps is not None:
        call["num_inference_steps"] = steps
    if guidance_scale is not None:
        call["guidance_scale"] = guidance_scale
    return call


def load_pipeline(model: str, revision: str | None = None):
    """The `MMDiTPipeline` in float32 on the CPU, or in bfloat16 on a GPU (where it is moved); a folder or repo that
    holds no pipeline is an `InputError`."""
    import torch

    from mmdit_diffusers import MMDiTPipeline

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    local = Path(model)
    if local.exists() and not (local / "model_index.json").is_file():
        raise InputError(f"--model {model}: the folder has no model_index.json, so it is not a pipeline folder")
    try:
        pipe = MMDiTPipeline.from_pretrained(model, revision=revision, dtype=dtype)
    except (OSError, ValueError) as err:
        raise InputError(f"--model {model}: cannot load a pipeline: {err}") from err
    return pipe.to("cuda") if torch.cuda.is_available() else pipe
