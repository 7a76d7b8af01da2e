"""Copy a trained pipeline folder into the repository as the shipped default, weights in float16.

    mmdit-diffusers export TRAINED_DIR pipelines/mmdit-shapes [--card CARD.md] [--samples SAMPLES.png]

The folder stores the sampler settings the recipe evaluates with (`SAMPLER_DEFAULTS`). The destination's model card (README.md) and sample pictures (*.png) are carried over to the new folder (the
card is written by hand: it reports the scores and the recipe), unless `card` / `samples` are given. The copy is
written beside the destination and renamed over it at the end, so the destination is never half written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..errors import InputError
from ..files import atomic_directory

MAX_WEIGHT_BYTES = 40 * 2**20  # the shipped pipeline's budget for all weights together
# The sampler the recipe evaluates the model with (its card's scores are at these): stored in the folder, where
# `MMDiTPipeline.__call__` and every command read them. The scheduler's shift and stochastic sampling travel in
# scheduler_config.json from the base pipeline.
SAMPLER_DEFAULTS = dict(num_inference_steps=60, guidance_scale=2.0, guidance_rescale=1.0, use_cfg_zero_star=True)
CARD = "README.md"


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*.safetensors"))


def export_pipeline(trained: str | Path, destination: str | Path, dtype: torch.dtype = torch.float16,
                    card: str | Path | None = None, samples: str | Path | None = None) -> Path:
    """Write `trained` in `dtype` to `destination`, with `card` as its README.md and `samples` beside it (default:
    the destination's own README.md and *.png). The weights must fit in MAX_WEIGHT_BYTES."""
    from ..pipelines import MMDiTPipeline

    destination = Path(destination)
    pictures = sorted(destination.glob("*.png")) if samples is None else [Path(samples)]
    keep = [(Path(card) if card is not None else destination / CARD, CARD)] + [(p, p.name) for p in pictures]
    pipe = MMDiTPipeline.from_pretrained(trained, dtype=torch.float32).to(dtype)
    pipe.register_sampler_defaults(**SAMPLER_DEFAULTS)
    with atomic_directory(destination) as staging:
        pipe.save_pretrained(staging)
        _drop_loading_flags(staging)
        for source, name in keep:  # read before the old destination is swapped out
            if source.is_file():
                shutil.copyfile(source, staging / name)
        size = weight_bytes(staging)
        if size > MAX_WEIGHT_BYTES:
            raise InputError(f"the weights take {size / 2**20:.1f} MiB, over the {MAX_WEIGHT_BYTES / 2**20:.0f} MiB "
                             "budget")
    return destination


def _drop_loading_flags(folder: Path) -> None:
    """transformers saves the `local_files_only` a tokenizer was loaded with (true under HF_HUB_OFFLINE=1) into its
    tokenizer_config.json; a shipped folder should not pin how its users load it."""
    for config in folder.glob("tokenizer*/tokenizer_config.json"):
        values = json.loads(config.read_text())
        if values.pop("local_files_only", None) is not None:
            config.write_text(json.dumps(values, indent=2, ensure_ascii=False) + "\n")
