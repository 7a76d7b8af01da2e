"""Command line and YAML config of `mmdit-diffusers train`.

Argument names follow diffusers' example training scripts. A YAML file given with `--config` holds the
same options by their names (`learning_rate: 1.0e-4`, `use_ema: true`, `validation_prompt: [a, b]`,
`model_config: {preset: tiny, depth: 1}`); its values are read first and the command line is read after
them, so the command line wins. Every problem is an `InputError` naming the option.

Settings that accelerate also has (`mixed_precision`) follow one rule: the command line wins over the YAML
(`--config`), the YAML over the accelerate config (`accelerate launch --mixed_precision` and the accelerate config
file reach the process as `ACCELERATE_MIXED_PRECISION`). A conflict is logged with both values.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from typing import Any

from ..arguments import (
    decay_rate,
    finite_float,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
    seed,
)
from ..errors import InputError
from ..files import folder_problem
from .buckets import bucket_spec
from .flow_matching import WEIGHTING_SCHEMES
from .optimizers import OPTIMIZERS

DEFAULT_LORA_LAYERS = "to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out"  # both streams, SD3 names
# the SD3 paper's mode density (eq. 20) is a density on [0, 1] for -1 <= s <= 2 / (pi - 2)
MODE_SCALE_MIN, MODE_SCALE_MAX = -1.0, 2.0 / (math.pi - 2.0)
DEFAULT_LORA_RANK = 16
ACCELERATE_MIXED_PRECISION = "ACCELERATE_MIXED_PRECISION"  # set by `accelerate launch` from its flags / config file

logger = logging.getLogger("mmdit_diffusers.train")


class _Parser(argparse.ArgumentParser):
    """argparse that raises `InputError` instead of printing usage and exiting."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise InputError(message)





def _shift(text: str) -> float | str:
    if text == "scheduler":
        return text
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number or 'scheduler', got {text}")
    return value


_shift.__name__ = "shift"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="mmdit-diffusers train",
        description="Rectified-flow text-to-image training of an MMDiT pipeline (full fine-tune, LoRA, or "
        "from scratch). Single process: `mmdit-diffusers train ...`; several GPUs or nodes: "
        "`accelerate launch -m mmdit_diffusers.train ...` (see docs/training.md).",
        allow_abbrev=False,
    )
    p.add_argument("--config", default=None, help="YAML file of options (same names); the command line wins.")

    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", default=None,
                   help="MMDiTPipeline folder or Hub id to start from (required).")
    g.add_argument("--revision", default=None, help="Hub revision of the pretrained pipeline.")
    g.add_argument("--variant", default=None, help="Weights variant of the pretrained pipeline (e.g. fp16).")
    g.add_argument("--model_config", default=None,
                   help="Train a new transformer from scratch instead of the pipeline's: a preset name "
                   "(see mmdit_diffusers.PRESETS), a JSON object of config overrides (optionally with "
                   "\"preset\": NAME as the base; otherwise the recommended defaults), or a .json file. "
                   "img_dim/txt_dim/cond_dim/in_channels come from the pipeline's VAE and text encoders.")
    g.add_argument("--use_lora", action=argparse.BooleanOptionalAction, default=False,
                   help=f"Train LoRA adapters instead of all weights (rank {DEFAULT_LORA_RANK} unless --rank).")
    g.add_argument("--rank", type=positive_int, default=None,
                   help="LoRA rank; giving it turns LoRA training on (same as --use_lora).")
    g.add_argument("--lora_alpha", type=positive_float, default=None, help="LoRA alpha (default: the rank, scale 1).")
    g.add_argument("--lora_layers", default=DEFAULT_LORA_LAYERS,
                   help="Comma-separated module names that get LoRA adapters.")

    g = p.add_argument_group("data")
    g.add_argument("--train_data_dir", default=None,
                   help="Folder of images with metadata.jsonl (file_name + caption column), as the "
                   "`datasets` imagefolder convention.")
    g.add_argument("--dataset_name", default=None, help="A `datasets` dataset (needs `pip install datasets`).")
    g.add_argument("--dataset_config_name", default=None)
    g.add_argument("--dataset_split", default="train")
    g.add_argument("--cache_dir", default=None, help="Where `datasets` caches downloads.")
    g.add_argument("--image_column", default="image",
                   help="Image column of --dataset_name (a folder always uses metadata `file_name`).")
    g.add_argument("--caption_column", default="text",
                   help="Caption column (default: text); a list of captions there: one of them, drawn anew each epoch.")
    g.add_argument("--max_train_samples", type=positive_int, default=None,
                   help="Use only the first N examples.")
    g.add_argument("--data_dir", default=None,
                   help="`data_dir` of `datasets.load_dataset` (e.g. --dataset_name imagefolder --data_dir FOLDER).")
    g.add_argument("--data_files", nargs="+", default=None, metavar="FILE",
                   help="`data_files` of `datasets.load_dataset`: files or globs, or SPLIT=FILE entries.")
    g.add_argument("--streaming", action=argparse.BooleanOptionalAction, default=False,
                   help="Stream --dataset_name (`load_dataset(..., streaming=True)`) instead of loading it; split "
                   "across processes, resumable. Needs --max_train_steps.")
    g.add_argument("--train_shards", nargs="+", default=None, metavar="SHARD",
                   help="WebDataset-style uncompressed .tar shards (files, folders or globs), streamed: each "
                   "process reads its own shards. Needs --max_train_steps.")
    g.add_argument("--shuffle_buffer_size", type=positive_int, default=1000,
                   help="Shuffle buffer of a streamed --dataset_name.")
    g.add_argument("--aspect_ratio_buckets", nargs="+", type=bucket_spec, default=None, metavar="SIZE",
                   help="Train at several sizes: 'auto' (about resolution^2 pixels, aspect ratios 1:2 to 2:1) or "
                   "WIDTHxHEIGHT sizes; each image goes to the bucket nearest its aspect ratio, each batch holds "
                   "one bucket.")
    g.add_argument("--random_crop", action=argparse.BooleanOptionalAction, default=False,
                   help="Crop at a random position (fixed by the seed and step) instead of the centre.")
    g.add_argument("--resolution", type=positive_int, default=512,
                   help="Training size: resize to cover resolution x resolution (or the aspect-ratio bucket), "
                   "then crop (centre unless --random_crop).")
    g.add_argument("--random_flip", action=argparse.BooleanOptionalAction, default=False,
                   help="Flip images horizontally with probability 1/2 (decided per epoch and example).")
    g.add_argument("--dataloader_num_workers", type=non_negative_int, default=0)
    g.add_argument("--cache_latents", action=argparse.BooleanOptionalAction, default=False,
                   help="Encode every image with the VAE once before training and keep the latent "
                   "distribution (mean, logvar); a fresh latent is sampled from it at every step.")
    g.add_argument("--vae_latent", choices=["sample", "mode"], default="sample",
                   help="x_0 is a sample of the VAE's latent distribution at every step (diffusers' examples) or "
                   "its mode (the mean: deterministic).")
    g.add_argument("--cache_text_embeddings", action=argparse.BooleanOptionalAction, default=False,
                   help="Encode every caption once before training; the text encoders are then freed.")
    g.add_argument("--embeddings_cache_dir", default=None,
                   help="Folder of the --cache_latents / --cache_text_embeddings caches (default: OUTPUT_DIR/cache), "
                   "one subfolder per encoder and data; a resumed or later run with the same ones reuses it.")
    g.add_argument("--max_sequence_length", type=positive_int, default=None,
                   help="T5 tokens per caption (the pipeline's encode_prompt; default: 256 or what the "
                   "transformer's txt_tokens allows).")
    g.add_argument("--caption_dropout_prob", type=probability, default=0.0,
                   help="Each text encoder independently sees an empty caption with this probability "
                   "(the unconditional input of classifier-free guidance).")
    g.add_argument("--caption_dropout_all_prob", type=probability, default=0.0,
                   help="Every text encoder sees an empty caption together with this probability: the "
                   "unconditional input of classifier-free guidance, trained as often as this says (with "
                   "independent drops alone it comes up only --caption_dropout_prob ** encoders of the time).")

    g = p.add_argument_group("objective")
    g.add_argument("--weighting_scheme", choices=WEIGHTING_SCHEMES, default="logit_normal",
                   help="Sigma sampling density / loss weighting (diffusers' "
                   "compute_density_for_timestep_sampling and compute_loss_weighting_for_sd3).")
    g.add_argument("--logit_mean", type=finite_float, default=0.0)
    g.add_argument("--logit_std", type=positive_float, default=1.0)
    g.add_argument("--mode_scale", type=finite_float, default=1.29,
                   help=f"Of the 'mode' density, in [-1, {MODE_SCALE_MAX:.3f}] (a density on [0, 1] only there).")
    g.add_argument("--guidance_scale", type=finite_float, default=3.5,
                   help="The value fed to the guidance embedding of transformers that have one (`guidance_embeds`, "
                   "FLUX.1 [dev]), as diffusers' FLUX training scripts; validation images of FLUX pipelines are drawn "
                   "with it too. Ignored by transformers without a guidance embedding.")
    g.add_argument("--resolution_shift", type=_shift, default=1.0,
                   help="Shift sampled sigmas: s' = shift*s / (1 + (shift-1)*s); 1 = none, 'scheduler' = the "
                   "pipeline scheduler's `shift`.")

    g = p.add_argument_group("optimization")
    g.add_argument("--train_batch_size", type=positive_int, default=4, help="Batch size per process.")
    g.add_argument("--gradient_accumulation_steps", type=positive_int, default=1)
    g.add_argument("--num_train_epochs", type=positive_int, default=1,
                   help="Used only when --max_train_steps is not given.")
    g.add_argument("--max_train_steps", type=positive_int, default=None, help="Optimizer steps in total.")
    g.add_argument("--learning_rate", type=positive_float, default=1e-4)
    g.add_argument("--scale_lr", action=argparse.BooleanOptionalAction, default=False,
                   help="Multiply the learning rate by batch size x accumulation x processes.")
    g.add_argument("--lr_scheduler", default="constant",
                   choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                            "constant_with_warmup"])
    g.add_argument("--lr_warmup_steps", type=non_negative_int, default=0)
    g.add_argument("--lr_num_cycles", type=positive_int, default=1)
    g.add_argument("--lr_power", type=positive_float, default=1.0)
    g.add_argument("--adam_beta1", type=decay_rate, default=0.9)
    g.add_argument("--adam_beta2", type=decay_rate, default=0.999)
    g.add_argument("--adam_weight_decay", type=non_negative_float, default=1e-2)
    g.add_argument("--adam_epsilon", type=positive_float, default=1e-8)
    g.add_argument("--optimizer", type=str.lower, choices=OPTIMIZERS, default="adamw",
                   help="adamw (torch), adamw8bit (bitsandbytes, CUDA only; diffusers' --use_8bit_adam) or prodigy "
                   "(prodigyopt; finds the step size itself: use --learning_rate 1.0). The --adam_* options apply "
                   "to all three.")
    g.add_argument("--prodigy_beta3", type=decay_rate, default=None,
                   help="Prodigy's step-size EMA coefficient (default: the square root of --adam_beta2).")
    g.add_argument("--prodigy_decouple", action=argparse.BooleanOptionalAction, default=True,
                   help="Prodigy: AdamW-style decoupled weight decay.")
    g.add_argument("--prodigy_use_bias_correction", action=argparse.BooleanOptionalAction, default=True,
                   help="Prodigy: Adam's bias correction.")
    g.add_argument("--prodigy_safeguard_warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="Prodigy: keep the step-size estimate from growing too fast during LR warmup.")
    g.add_argument("--max_grad_norm", type=non_negative_float, default=1.0, help="Gradient clipping; 0 turns it off.")
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                   help="Wins over `mixed_precision` in --config, which wins over the accelerate config "
                   "(`accelerate launch --mixed_precision`, ACCELERATE_MIXED_PRECISION); a conflict is logged.")
    g.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=False)
    g.add_argument("--allow_tf32", action=argparse.BooleanOptionalAction, default=False)
    g.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=False,
                   help="Keep an EMA of the weights (diffusers EMAModel); the exported model uses it.")
    g.add_argument("--ema_decay", type=probability, default=0.9999)
    g.add_argument("--seed", type=seed, default=None,
                   help="Seed of the data order, noise and init (default: random, stored in checkpoints).")

    g = p.add_argument_group("checkpoints and output")
    g.add_argument("--output_dir", default="mmdit-model")
    g.add_argument("--logging_dir", default="logs", help="Tracker folder, relative to --output_dir.")
    g.add_argument("--checkpointing_steps", type=positive_int, default=500)
    g.add_argument("--checkpoints_total_limit", type=positive_int, default=None,
                   help="Keep only the newest N checkpoints of this run (never another run's).")
    g.add_argument("--overwrite_output_dir", action=argparse.BooleanOptionalAction, default=False,
                   help="Start a new run in an --output_dir that holds another run's checkpoints or model: its "
                   "checkpoints, validation grids and logs are removed at the start, its model when the new one is "
                   "exported. Without it such a folder is refused (unless resuming that run).")
    g.add_argument("--resume_from_checkpoint", default=None,
                   help="A checkpoint folder, or 'latest' (the newest checkpoint-N in --output_dir; "
                   "starts fresh if there is none).")
    g.add_argument("--report_to", default="tensorboard",
                   choices=["tensorboard", "wandb", "comet_ml", "all", "none"])
    g.add_argument("--tracker_project_name", default="mmdit-train")

    g = p.add_argument_group("validation")
    g.add_argument("--validation_prompt", nargs="+", default=None,
                   help="One or more prompts rendered every --validation_steps and at the end.")
    g.add_argument("--num_validation_images", type=positive_int, default=4, help="Images per prompt.")
    g.add_argument("--validation_steps", type=positive_int, default=500)
    g.add_argument("--validation_inference_steps", type=positive_int, default=28)
    g.add_argument("--validation_guidance_scale", type=non_negative_float, default=5.0,
                   help="Classifier-free guidance of the validation images (FLUX pipelines: `true_cfg_scale`, "
                   "against the empty prompt; 1 turns it off).")

    g = p.add_argument_group("hub")
    g.add_argument("--push_to_hub", action=argparse.BooleanOptionalAction, default=False,
                   help="Upload the final folder (token from `hf auth login` / HF_TOKEN; never printed).")
    g.add_argument("--hub_model_id", default=None, help="Repository id (default: the output folder name).")
    g.add_argument("--hub_private", action=argparse.BooleanOptionalAction, default=False)
    return p


# ----------------------------------------------------------------------------------------------------------
# YAML config -> argv tokens (so types, choices and flags are checked the same way)
# ----------------------------------------------------------------------------------------------------------
def _config_tokens(parser: argparse.ArgumentParser, path: str) -> list[str]:
    import yaml

    if not os.path.isfile(path):
        raise InputError(f"--config {path!r}: no such file.")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise InputError(f"--config {path!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise InputError(f"--config {path!r} must hold a mapping of option: value.")
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    tokens: list[str] = []
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in actions or dest in ("config", "help"):
            raise InputError(f"--config {path!r}: unknown option {key!r}.")
        action = actions[dest]
        flag = f"--{dest}"
        if value is None:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                raise InputError(f"--config {path!r}: {key} must be true or false, got {value!r}.")
            tokens.append(flag if value else f"--no-{dest}")
        elif isinstance(value, dict):
            tokens += [flag, json.dumps(value)]
        elif isinstance(value, (list, tuple)):
            if action.nargs not in ("+", "*"):
                raise InputError(f"--config {path!r}: {key} takes one value, got a list.")
            tokens += [flag, *map(str, value)]
        else:
            tokens += [flag, str(value)]
    return tokens


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse (YAML config, then) the command line and check the combination."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    pre = _Parser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    pre.add_argument("--mixed_precision", default=None)
    known, _ = pre.parse_known_args(argv)
    tokens = _config_tokens(parser, known.config) if known.config else []
    args = parser.parse_args(tokens + argv)
    check_args(args)
    _log_precision_conflicts(args, known.mixed_precision, pre.parse_known_args(tokens)[0].mixed_precision)
    return args


def _log_precision_conflicts(args: argparse.Namespace, command_line: str | None, config: str | None) -> None:
    """Log (main process) every setter that `args.mixed_precision` overrides: the command line beats the YAML, the
    one that set it beats the accelerate config. None of them set: accelerate's own value applies."""
    launch = os.environ.get(ACCELERATE_MIXED_PRECISION, "").strip().lower()
    if args.mixed_precision is None or os.environ.get("RANK", "0") != "0":
        return
    if command_line is not None:
        winner = f"--mixed_precision {command_line} (command line)"
        if config is not None and config != command_line:
            logger.warning(f"{winner} overrides mixed_precision: {config} in --config {args.config}.")
    else:
        winner = f"mixed_precision: {config} in --config {args.config}"
    if launch and launch != args.mixed_precision:
        logger.warning(f"{winner} overrides the accelerate config's mixed precision {launch} "
                       f"({ACCELERATE_MIXED_PRECISION}, from `accelerate launch --mixed_precision` or its config "
                       "file); leave it out of the trainer's options to use accelerate's.")


def check_args(args: argparse.Namespace) -> None:
    """Consistency checks, and whether --output_dir can be written; the inputs (data, pipeline, checkpoints) are
    checked in the loop, before any step."""
    if not args.pretrained_model_name_or_path:
        raise InputError(
            "--pretrained_model_name_or_path is required: an MMDiTPipeline folder or Hub id (its VAE and text "
            "encoders are used; add --model_config to train a new transformer from scratch)."
        )
    check_data_args(args)
    if args.rank is not None:
        args.use_lora = True
    if args.use_lora and args.rank is None:
        args.rank = DEFAULT_LORA_RANK
    if args.use_lora and args.model_config:
        raise InputError("--model_config trains a new transformer from scratch; it cannot be combined "
                                  "with LoRA (--use_lora / --rank).")
    if args.lora_alpha is None and args.rank is not None:
        args.lora_alpha = float(args.rank)
    if args.weighting_scheme == "mode" and not MODE_SCALE_MIN <= args.mode_scale <= MODE_SCALE_MAX:
        raise InputError(
            f"--mode_scale {args.mode_scale}: the 'mode' density needs a scale in [{MODE_SCALE_MIN:g}, "
            f"{MODE_SCALE_MAX:.3f}] (outside it, sampled sigmas leave [0, 1])."
        )
    output_dir = os.path.abspath(args.output_dir)
    for option, folder in (("--output_dir", output_dir), ("--logging_dir", os.path.join(output_dir, args.logging_dir))):
        problem = folder_problem(folder)
        if problem:
            raise InputError(f"{option} {folder}: {problem}.")
    if args.push_to_hub and args.hub_model_id is None:
        args.hub_model_id = os.path.basename(os.path.abspath(args.output_dir))
    if args.report_to == "none":
        args.report_to = None
    if isinstance(args.validation_prompt, list) and not args.validation_prompt:
        args.validation_prompt = None


def check_data_args(args: argparse.Namespace) -> None:
    """The data options: one source, and what streams and buckets combine with."""
    if sum(map(bool, (args.train_data_dir, args.dataset_name, args.train_shards))) != 1:
        raise InputError("give exactly one of --train_data_dir (a folder), --dataset_name or --train_shards.")
    for option in ("data_dir", "data_files"):
        if getattr(args, option) and not args.dataset_name:
            raise InputError(f"--{option} is passed to `datasets.load_dataset`; it needs --dataset_name (e.g. "
                             "imagefolder).")
    if args.streaming and args.train_data_dir:
        raise InputError("--streaming applies to --dataset_name; a --train_data_dir folder is read as it is "
                         "(for tar shards use --train_shards).")
    streamed = "--train_shards" if args.train_shards else "--streaming" if args.streaming else None
    if streamed:
        if args.max_train_steps is None:
            raise InputError(f"{streamed}: a stream has no known length; give --max_train_steps.")
        for option in ("cache_latents", "cache_text_embeddings", "aspect_ratio_buckets", "max_train_samples"):
            if getattr(args, option):
                raise InputError(f"--{option} needs the whole dataset up front; it cannot be combined with "
                                 f"{streamed}.")
    if args.cache_latents:
        for option in ("aspect_ratio_buckets", "random_crop"):
            if getattr(args, option):
                raise InputError(f"--cache_latents encodes one square centre crop per image; it cannot be combined "
                                 f"with --{option}.")


def args_to_config(args: argparse.Namespace) -> dict[str, Any]:
    """The options as tracker hyper-parameters (scalars only)."""
    out = {}
    for key, value in sorted(vars(args).items()):
        if isinstance(value, (bool, int, float, str)):
            out[key] = value
        elif value is None:
            out[key] = "None"
        else:
            out[key] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return out
