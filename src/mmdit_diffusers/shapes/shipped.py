"""The shipped Shapes pipeline: where it is, and how the commands (`generate`, `evaluate`, `probe`) choose and load a
pipeline.

The folder ships inside the package as package data (`mmdit_diffusers/shapes/mmdit-shapes`; in the source checkout
a link to `pipelines/mmdit-shapes/`), so an installed wheel finds it exactly as the checkout does. Its sampler
settings are stored in the folder itself (`sampler_defaults` in model_index.json, used by `MMDiTPipeline.__call__`
for the arguments a caller leaves out), like any pipeline folder's: no command treats it specially.
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

from ..arguments import non_negative_float, positive_int
from ..errors import InputError

SHIPPED_PIPELINE = Path(str(resources.files(__package__).joinpath("mmdit-shapes")))


def resolve_model(model: str | None) -> str:
    """`model`, or the shipped pipeline's folder when it is None."""
    if model is not None:
        return model
    if not (SHIPPED_PIPELINE / "model_index.json").is_file():
        raise InputError(f"no --model given and the shipped pipeline is missing at {SHIPPED_PIPELINE}; pass --model "
                         "with a pipeline folder or a Hub repo id")
    return str(SHIPPED_PIPELINE)


def add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --revision, --steps, --guidance_scale and --cache_interval, as `generate` and `evaluate` take them."""
    parser.add_argument("--model", default=None,
                        help="pipeline folder or Hub repo id (default: the shipped Shapes pipeline)")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="sampler steps (default: the folder's sampler_defaults, else 28)")
    parser.add_argument("--guidance_scale", type=non_negative_float, default=None,
                        help="classifier-free guidance, > 1 to guide (default: the folder's sampler_defaults, else 7.0)")
    parser.add_argument("--cache_interval", type=positive_int, default=None,
                        help="run the transformer on every N-th step only (after 6 full ones) and predict the clean "
                             "image in between (CleanImageCacheConfig; 2: ~1.75x faster on the Shapes pipeline for "
                             "~0.6 points of its score). Default: every step")


def call_arguments(steps: int | None, guidance_scale: float | None) -> dict:
    """The pipeline call's sampler arguments that the command line sets; the rest come from the pipeline folder."""
    given = dict(num_inference_steps=steps, guidance_scale=guidance_scale)
    return {name: value for name, value in given.items() if value is not None}


def load_pipeline(model: str, revision: str | None = None, cache_interval: int | None = None):
    """The `MMDiTPipeline` in float32 on the CPU, or in bfloat16 on a GPU (where it is moved), with its transformer's
    `CleanImageCacheConfig(cache_interval=...)` when `cache_interval` is given; a folder or repo that holds no
    pipeline is an `InputError`."""
    import torch

    from mmdit_diffusers import CleanImageCacheConfig, MMDiTPipeline

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    local = Path(model)
    if local.exists() and not (local / "model_index.json").is_file():
        raise InputError(f"--model {model}: the folder has no model_index.json, so it is not a pipeline folder")
    try:
        pipe = MMDiTPipeline.from_pretrained(model, revision=revision, dtype=dtype)
    except (OSError, ValueError) as err:
        raise InputError(f"--model {model}: cannot load a pipeline: {err}") from err
    if cache_interval is not None:
        pipe.transformer.enable_cache(CleanImageCacheConfig(cache_interval=cache_interval))
    return pipe.to("cuda") if torch.cuda.is_available() else pipe
