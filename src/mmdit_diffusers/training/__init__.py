"""Rectified-flow text-to-image training of `MMDiTTransformer2DModel` under accelerate.

One concept per module:

- `args`: the command line and the YAML config (`--config`; the command line wins), with validation.
- `flow_matching`: the objective (sigma sampling, x_t, target, loss weighting) as small pure functions.
- `data`: image-caption datasets (folder with `metadata.jsonl`, or a `datasets` dataset), transforms,
  the deterministic resumable batch sampler and the latent cache.
- `text`: captions -> text conditioning, per-encoder caption dropout and the text-embedding cache.
- `loop`: the accelerate training loop.
- `checkpointing`: atomic `save_state`, rotation and resume.
- `errors`: `TrainingConfigError` (bad input, exit 2) and `TrainingDivergedError` (non-finite loss, exit 1).
- `validation`: PNG grids of sample images, logged to the trackers.
- `export`: the final pipeline folder (or LoRA weights), the model card and the Hub push.

The entry point is `mmdit_diffusers.train` (`accelerate launch -m mmdit_diffusers.train --config ...`); see
docs/training.md.
"""

from .args import build_parser, parse_args
from .errors import TrainingConfigError, TrainingDivergedError
from .flow_matching import (
    flow_matching_loss,
    loss_weighting,
    noisy_latents,
    sample_sigmas,
    shift_sigmas,
    sigmas_to_timesteps,
    velocity_target,
)

__all__ = [
    "TrainingConfigError",
    "TrainingDivergedError",
    "build_parser",
    "parse_args",
    "flow_matching_loss",
    "loss_weighting",
    "noisy_latents",
    "sample_sigmas",
    "shift_sigmas",
    "sigmas_to_timesteps",
    "velocity_target",
]

