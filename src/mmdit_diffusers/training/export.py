"""The end of a run: the model in `output_dir`, and what its model card should say.

- Full fine-tune / from scratch: a complete pipeline folder (`save_pretrained`: model_index.json, transformer/,
  vae/, text encoders, tokenizers, scheduler), with the EMA weights when `--use_ema`. The other components are
  re-read from `--pretrained_model_name_or_path`, so they are exactly the starting pipeline's even when the
  caches freed them during training. `MMDiTPipeline.from_pretrained(output_dir)` loads it.
- LoRA: `pytorch_lora_weights.safetensors` (diffusers' LoRA format, with the adapter config as metadata);
  `pipe.load_lora_weights(output_dir)` loads it into the base pipeline.
- Both are written beside, then swapped in: a kill at any moment leaves the old complete model or the new one
  (see `swap_in_pipeline`).
- Both: `card_data`, the run's model card fields (what was trained from what, the `training` table, the first
  validation prompt for the card's code example). Training writes no card and pushes nothing: the command line
  (`mmdit-diffusers train`) writes the card with `mmdit_diffusers.hub.write_model_card` and, with
  `--push_to_hub`, uploads the folder without `RUN_FILES` (checkpoints, temporary folders, logs).
"""

from __future__ import annotations

import json
import os
import shutil

from ..files import fsync_directory, fsync_tree

# the run's own files in output_dir, not part of the model: left out of a Hub upload
RUN_FILES = ["checkpoint-*", ".tmp-checkpoint-*", ".deleting-checkpoint-*", "logs/*", "*.tmp", "training_summary.json",
             "run.json", ".run.lock", ".export-*", "cache/*"]
INDEX = "model_index.json"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
MODEL_FILES = (INDEX, LORA_WEIGHTS)  # an exported model in a folder
# the export's own folders in output_dir: being written / complete and on disk / the replaced pipeline's entries
WRITING, READY, REPLACED = ".export-writing", ".export-ready", ".export-replaced"


def _pipeline_class():
    from ..pipelines import MMDiTPipeline

    return MMDiTPipeline


def _components(index_path: str) -> list[str]:
    """The component folder names a model_index.json lists (empty when it is missing or unreadable)."""
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError):
        return []
    if not isinstance(index, dict):
        return []
    return [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list)]


def _writing_folder(output_dir: str) -> str:
    """An empty `.export-writing` folder (a leftover of an interrupted export is removed first)."""
    finish_interrupted_export(output_dir)
    staging = os.path.join(output_dir, WRITING)
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    return staging


def swap_in_pipeline(output_dir: str) -> None:
    """Move the complete pipeline in `output_dir/.export-ready` into `output_dir`.

    `model_index.json` marks a pipeline, so it leaves first and comes back last: the old index moves out, each
    component folder of the new pipeline (and each of the old one's that the new one lacks) is exchanged, then the
    new index moves in. A reader therefore sees the old complete pipeline, no pipeline (the few renames in
    between), or the new one, never a mix; every step can be repeated, so `finish_interrupted_export` completes a
    swap that a kill stopped."""
    ready, replaced = os.path.join(output_dir, READY), os.path.join(output_dir, REPLACED)
    os.makedirs(replaced, exist_ok=True)
    index, new_index = os.path.join(output_dir, INDEX), os.path.join(ready, INDEX)
    if os.path.exists(new_index) and os.path.exists(index):
        os.replace(index, os.path.join(replaced, INDEX))
    # the new pipeline's entries: those still waiting in `ready` and those its index lists (moved before a kill)
    listed = _components(new_index if os.path.exists(new_index) else index)
    new = sorted(set(listed) | set(os.listdir(ready)) - {INDEX})
    old_only = [name for name in _components(os.path.join(replaced, INDEX)) if name not in new]
    for name in old_only + new:
        current = os.path.join(output_dir, name)
        if name in new and not os.path.exists(os.path.join(ready, name)):
            continue  # swapped before an interruption
        if os.path.lexists(current):
            shutil.rmtree(os.path.join(replaced, name), ignore_errors=True)
            os.replace(current, os.path.join(replaced, name))
        if name in new:
            os.replace(os.path.join(ready, name), current)
    if os.path.exists(new_index):
        fsync_directory(output_dir)
        os.replace(new_index, index)
    fsync_directory(output_dir)
    shutil.rmtree(ready, ignore_errors=True)
    shutil.rmtree(replaced, ignore_errors=True)


def finish_interrupted_export(output_dir: str) -> None:
    """After a kill: complete a swap whose new pipeline was complete (`.export-ready`); drop a half-written one."""
    if os.path.isdir(os.path.join(output_dir, READY)):
        swap_in_pipeline(output_dir)
    for name in (WRITING, REPLACED):
        shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def save_full_pipeline(args, transformer, output_dir: str) -> None:
    """Write the starting pipeline with `transformer` swapped in as a complete folder in `output_dir`: into
    `.export-writing`, flushed to disk, renamed `.export-ready` (complete), then `swap_in_pipeline`."""
    pipeline_cls = _pipeline_class()
    kwargs = {"revision": args.revision, "variant": args.variant}
    pipe = pipeline_cls.from_pretrained(
        args.pretrained_model_name_or_path, transformer=transformer, **{k: v for k, v in kwargs.items() if v}
    )
    staging = _writing_folder(output_dir)
    try:
        pipe.save_pretrained(staging)
        fsync_tree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    os.replace(staging, os.path.join(output_dir, READY))
    swap_in_pipeline(output_dir)


def save_lora(transformer, output_dir: str) -> str:
    """Write the transformer's LoRA adapter as `output_dir/pytorch_lora_weights.safetensors` (written beside, then
    renamed over the old file)."""
    from peft.utils import get_peft_model_state_dict

    pipeline_cls = _pipeline_class()
    layers = get_peft_model_state_dict(transformer)
    metadata = transformer.peft_config["default"].to_dict()
    metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in metadata.items()}
    staging = _writing_folder(output_dir)
    try:
        pipeline_cls.save_lora_weights(staging, transformer_lora_layers=layers,
                                       transformer_lora_adapter_metadata=metadata)
        fsync_tree(staging)
        os.replace(os.path.join(staging, LORA_WEIGHTS), os.path.join(output_dir, LORA_WEIGHTS))
        fsync_directory(output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return os.path.join(output_dir, LORA_WEIGHTS)


def training_details(args, global_step: int, num_examples: int, num_processes: int) -> dict:
    """The run's settings as the `training` table of the Hub model card."""
    return {
        "method": ("LoRA rank %d" % args.rank) if args.use_lora else ("from scratch" if args.model_config else "full fine-tune"),
        "objective": "rectified flow (SD3)",
        "optimizer steps": global_step,
        "examples": num_examples,
        "resolution": args.resolution,
        "batch": f"{args.train_batch_size} x {args.gradient_accumulation_steps} x {num_processes}",
        "optimizer": args.optimizer,
        "learning rate": f"{args.learning_rate:g} ({args.lr_scheduler}, warmup {args.lr_warmup_steps})",
        "sigma sampling": args.weighting_scheme,
        "caption dropout": f"{args.caption_dropout_prob:g} per encoder, {args.caption_dropout_all_prob:g} all together",
        "EMA": args.ema_decay if args.use_ema else "no",
        "mixed precision": args.mixed_precision or "accelerate default",
    }


def card_data(args, global_step: int, num_examples: int, num_processes: int) -> dict:
    """The run's fields for `mmdit_diffusers.hub.write_model_card`: a description, the `training` table, tags, the
    base model (a Hub repo the run started from) and the first validation prompt (the card's code example)."""
    base = args.pretrained_model_name_or_path
    if args.use_lora:
        kind = "LoRA (rank %d, alpha %g) on the transformer of" % (args.rank, args.lora_alpha)
    elif args.model_config:
        kind = "A transformer trained from scratch (`%s`) with the VAE and text encoders of" % args.model_config
    else:
        kind = "A full fine-tune of"
    data = {
        "description": f"{kind} `{base}`, trained with rectified flow (SD3's objective) by `mmdit-diffusers train`.",
        "training": training_details(args, global_step, num_examples, num_processes),
        "tags": ["diffusers-training", "rectified-flow"],
    }
    if not args.model_config and not os.path.isdir(base):
        data["base_model"] = base
    if args.validation_prompt:
        data["prompt"] = args.validation_prompt[0]
    return data
