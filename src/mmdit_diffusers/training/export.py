"""The end of a run: the model in `output_dir`, and what its model card should say.

- Full fine-tune / from scratch: a complete pipeline folder (`save_pretrained`: model_index.json, transformer/,
  vae/, text encoders, tokenizers, scheduler), with the EMA weights when `--use_ema`. The other components are
  re-read from `--pretrained_model_name_or_path`, so they are exactly the starting pipeline's even when the
  caches freed them during training. `MMDiTPipeline.from_pretrained(output_dir)` loads it.
- LoRA: `pytorch_lora_weights.safetensors` (diffusers' LoRA format, with the adapter config as metadata);
  `pipe.load_lora_weights(output_dir)` loads it into the base pipeline.
- Both: `card_data`, the run's model card fields (what was trained from what, the `training` table, the first
  validation prompt for the card's code example). Training writes no card and pushes nothing: the command line
  (`mmdit-diffusers train`) writes the card with `mmdit_diffusers.hub.write_model_card` and, with
  `--push_to_hub`, uploads the folder without `RUN_FILES` (checkpoints, temporary folders, logs).
"""

from __future__ import annotations

import os

# the run's own files in output_dir, not part of the model: left out of a Hub upload
RUN_FILES = ["checkpoint-*", ".tmp-checkpoint-*", ".deleting-checkpoint-*", "logs/*", "*.tmp", "training_summary.json",
             "cache/*"]


def _pipeline_class():
    from ..pipelines import MMDiTPipeline

    return MMDiTPipeline


def save_full_pipeline(args, transformer, output_dir: str) -> None:
    """Write the starting pipeline with `transformer` swapped in as a complete folder in `output_dir`."""
    pipeline_cls = _pipeline_class()
    kwargs = {"revision": args.revision, "variant": args.variant}
    pipe = pipeline_cls.from_pretrained(
        args.pretrained_model_name_or_path, transformer=transformer, **{k: v for k, v in kwargs.items() if v}
    )
    pipe.save_pretrained(output_dir)


def save_lora(transformer, output_dir: str) -> str:
    """Write the transformer's LoRA adapter as `output_dir/pytorch_lora_weights.safetensors`."""
    from peft.utils import get_peft_model_state_dict

    pipeline_cls = _pipeline_class()
    layers = get_peft_model_state_dict(transformer)
    metadata = transformer.peft_config["default"].to_dict()
    metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in metadata.items()}
    pipeline_cls.save_lora_weights(output_dir, transformer_lora_layers=layers,
                                   transformer_lora_adapter_metadata=metadata)
    return os.path.join(output_dir, "pytorch_lora_weights.safetensors")


def training_details(args, global_step: int, num_examples: int, num_processes: int) -> dict:
    """The run's settings as the `training` table of the Hub model card."""
    return {
        "method": ("LoRA rank %d" % args.rank) if args.use_lora else ("from scratch" if args.model_config else "full fine-tune"),
        "objective": "rectified flow (SD3)",
        "optimizer steps": global_step,
        "examples": num_examples,
        "resolution": args.resolution,
        "batch": f"{args.train_batch_size} x {args.gradient_accumulation_steps} x {num_processes}",
        "learning rate": f"{args.learning_rate:g} ({args.lr_scheduler}, warmup {args.lr_warmup_steps})",
        "sigma sampling": args.weighting_scheme,
        "caption dropout": args.caption_dropout_prob,
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
