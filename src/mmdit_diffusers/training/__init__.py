"""Rectified-flow text-to-image training of `MMDiTTransformer2DModel` under accelerate.

One concept per module:

- `args`: the command line and the YAML config (`--config`; the command line wins), with validation.
- `flow_matching`: the objective (sigma sampling, x_t, target, loss weighting) as small pure functions.
- `data`: image-caption datasets (`load_image_folder`: a folder with `metadata.jsonl`; or a `datasets` dataset),
  transforms, the deterministic resumable batch sampler and the latent cache.
- `streaming`: streamed sources (`--streaming`, `--train_shards`) and their order of micro-batches.
- `sources`: which of the two the arguments ask for (`load_source`, `make_sampler`).
- `text`: captions -> text conditioning (the pipeline's own `pipelines.text_encoding`), per-encoder caption
  dropout and the text-embedding cache.
- `cache`: the disk caches behind them: fingerprinted folders of safetensors shards, built by all processes
  together, memory-mapped when training, reused by later runs.
- `loop`: the accelerate training loop: `train(args) -> TrainResult`; `TrainingDivergedError` (non-finite loss).
- `checkpointing`: atomic `save_state`, rotation (of the run's own checkpoints) and resume.
- `run_folder`: a run owns its `--output_dir` (manifest `run.json`, lock `.run.lock`, refusal of another run's folder).
- `optimizers`: `--optimizer adamw|adamw8bit|prodigy`, checked before any model is loaded.
- `validation`: PNG grids of sample images, logged to the trackers.
- `export`: the final pipeline folder (or LoRA weights), written beside and swapped in, and the model card's fields.

Bad input is `mmdit_diffusers.errors.InputError`. Training writes no model card and never talks to the Hub's
upload API: `mmdit-diffusers train` (the command line) writes the card from the `TrainResult` and pushes. The
command: `accelerate launch -m mmdit_diffusers.train --config ...` or `mmdit-diffusers train --config ...`; see
docs/training.md.

Names are resolved on first use (PEP 562), so the command line's parser (`args`) loads without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

_EXPORTS = {
    "train": ".loop",
    "TrainResult": ".loop",
    "TrainingDivergedError": ".loop",
    "build_parser": ".args",
    "parse_args": ".args",
    "load_image_folder": ".data",
    "flow_matching_loss": ".flow_matching",
    "loss_weighting": ".flow_matching",
    "noisy_latents": ".flow_matching",
    "sample_sigmas": ".flow_matching",
    "shift_sigmas": ".flow_matching",
    "sigmas_to_timesteps": ".flow_matching",
    "velocity_target": ".flow_matching",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from .args import build_parser, parse_args  # noqa: F401
    from .data import load_image_folder  # noqa: F401
    from .flow_matching import (  # noqa: F401
        flow_matching_loss,
        loss_weighting,
        noisy_latents,
        sample_sigmas,
        shift_sigmas,
        sigmas_to_timesteps,
        velocity_target,
    )
    from .loop import TrainingDivergedError, TrainResult, train  # noqa: F401

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
