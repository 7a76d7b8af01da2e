"""The end of a run: the model in `output_dir`, its model card, and the optional Hub push.

- Full fine-tune / from scratch: a complete pipeline folder (`save_pretrained`: model_index.json, transformer/,
  vae/, text encoders, tokenizers, scheduler), with the EMA weights when `--use_ema`. The other components are
  re-read from `--pretrained_model_name_or_path`, so they are exactly the starting pipeline's even when the
  caches freed them during training. `MMDiTPipeline.from_pretrained(output_dir)` loads it.
- LoRA: `pytorch_lora_weights.safetensors` (diffusers' LoRA format, with the adapter config as metadata);
  `pipe.load_lora_weights(output_dir)` loads it into the base pipeline.
- Both: a `README.md` model card; with `--push_to_hub`, the folder without checkpoints, temporary folders and
  logs goes to the Hub through `mmdit_diffusers.hub.push_pipeline_folder` (one commit; the card gets the
  project's generated section). The token comes from the usual places (HF_TOKEN, `hf auth login`) and is
  never printed.
"""

from __future__ import annotations

import os

HUB_IGNORE = ["checkpoint-*", ".tmp-checkpoint-*", ".deleting-checkpoint-*", "logs/*", "*.tmp", "training_summary.json"]


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


def write_model_card(args, output_dir: str, global_step: int, num_examples: int, num_processes: int,
                     validation_image: str | None = None) -> str:
    lora = bool(args.use_lora)
    base = args.pretrained_model_name_or_path
    base_is_repo = not os.path.isdir(base)
    tags = ["text-to-image", "diffusers", "diffusers-training", "mmdit", "rectified-flow"] + (["lora"] if lora else [])
    front = ["---", "library_name: diffusers", "license: other", "pipeline_tag: text-to-image"]
    if base_is_repo and not args.model_config:
        front.append(f"base_model: {base}")
    front.append("tags:")
    front += [f"- {t}" for t in tags]
    front.append("---")

    kind = ("LoRA (rank %d, alpha %g) on the transformer of" % (args.rank, args.lora_alpha)) if lora else (
        "A transformer trained from scratch (`%s`) with the VAE and text encoders of" % args.model_config
        if args.model_config else "A full fine-tune of")
    name = os.path.basename(os.path.abspath(output_dir))
    total_batch = args.train_batch_size * args.gradient_accumulation_steps * num_processes
    lines = front + [
        "",
        f"# {name}",
        "",
        f"{kind} `{base}`, trained with rectified flow (SD3's objective) by `mmdit_diffusers.train`.",
        "",
    ]
    if validation_image:
        rel = os.path.relpath(validation_image, output_dir).replace(os.sep, "/")
        prompts = " | ".join(args.validation_prompt or [])
        lines += [f"![validation samples]({rel})", "", f"Prompts (one row each): {prompts}", ""]
    lines += [
        "## Use",
        "",
        "```python",
        "from mmdit_diffusers import MMDiTPipeline",
        "",
    ]
    repo = args.hub_model_id or output_dir
    if lora:
        lines += [f'pipe = MMDiTPipeline.from_pretrained("{base}")', f'pipe.load_lora_weights("{repo}")']
    else:
        lines += [f'pipe = MMDiTPipeline.from_pretrained("{repo}")']
    prompt = (args.validation_prompt or ["a photo"])[0].replace('"', "'")
    lines += [f'image = pipe("{prompt}").images[0]', "```", ""]
    lines += [
        "## Training",
        "",
        "| setting | value |",
        "|---|---|",
        f"| optimizer steps | {global_step} |",
        f"| examples | {num_examples} |",
        f"| resolution | {args.resolution} |",
        f"| batch (per process x accumulation x processes) | {args.train_batch_size} x {args.gradient_accumulation_steps} x {num_processes} = {total_batch} |",
        f"| learning rate / schedule / warmup | {args.learning_rate:g} / {args.lr_scheduler} / {args.lr_warmup_steps} |",
        f"| sigma sampling | {args.weighting_scheme} (logit mean {args.logit_mean:g}, std {args.logit_std:g}, mode scale {args.mode_scale:g}), shift {args.resolution_shift} |",
        f"| caption dropout (per text encoder) | {args.caption_dropout_prob:g} |",
        f"| mixed precision | {args.mixed_precision or 'accelerate default'} |",
        f"| EMA | {'decay %g' % args.ema_decay if args.use_ema else 'no'} |",
        f"| seed | {args.seed} |",
        "",
    ]
    path = os.path.join(output_dir, "README.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return path


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


def push_to_hub(args, output_dir: str, training: dict, validation_image: str | None = None) -> str:
    """Upload `output_dir` (without checkpoints, temporary folders and logs) with `mmdit_diffusers.hub`'s
    `push_pipeline_folder`: the local README.md is kept and its generated section (architecture, loading code,
    this run's `training` table, the final validation grid as a sample) is filled in. Returns the repo id.
    Raises `mmdit_diffusers.hub.HubError` (token-free message) when the Hub refuses or cannot be reached."""
    from ..hub import push_pipeline_folder

    base = args.pretrained_model_name_or_path
    card_data = {"training": training}
    if not args.model_config and not os.path.isdir(base):
        card_data["base_model"] = base
    if args.validation_prompt:
        card_data["prompt"] = args.validation_prompt[0]
    samples = [(" | ".join(args.validation_prompt), validation_image)] if validation_image else None
    push_pipeline_folder(
        output_dir, args.hub_model_id, private=args.hub_private or None, ignore_patterns=HUB_IGNORE,
        card_data=card_data, sample_images=samples,
        commit_message=f"mmdit_diffusers.train: {'LoRA' if args.use_lora else 'pipeline'} after {training['optimizer steps']} steps",
    )
    return args.hub_model_id  # the canonical id: the repository was created at the start of the run
