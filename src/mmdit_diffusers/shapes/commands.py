"""The Shapes recipe's commands, run as `mmdit-diffusers COMMAND` (the command line lists them from here):

    evaluate        score a pipeline on the Shapes prompt set
    dataset         write a Shapes training set (imagefolder with metadata.jsonl)
    vae             train the Shapes AutoencoderKL on it
    text-encoders   train the Shapes CLIP and T5 text encoders on it
    base            assemble the untrained base pipeline (text encoders, VAE, fresh transformer)
    export          copy a trained pipeline into the shipped folder, weights in float16
    probe           does a pipeline read the words that matter? (a loss probe)

`scripts/train_shapes.sh` runs dataset, vae, text-encoders, base, `mmdit-diffusers train`, export and evaluate.
Each command is (help, build_parser, run). This module imports no torch, diffusers or transformers: `--help`
answers at once; `run` imports the step's module. Bad input raises `mmdit_diffusers.errors.InputError`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..arguments import non_negative_float, non_negative_int, positive_float, positive_int, seed
from ..errors import InputError
from ..files import folder_problem, free_path, output_problem
from .shipped import SHIPPED_PIPELINE, add_pipeline_arguments

DEFAULT_GRID = "outputs/evaluate-grid.png"


def _parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"mmdit-diffusers {name}", description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def _png(path: str | None, option: str) -> None:
    if path is not None and Path(path).suffix.lower() != ".png":
        raise InputError(f"{option} {path}: expected a .png file name")


def _output(path: str, option: str, overwrite: bool) -> None:
    problem = output_problem(path, overwrite)
    if problem:
        raise InputError(f"{option} {path}: {problem}")


def _input_folder(path: str, option: str) -> None:
    if not Path(path).is_dir():
        raise InputError(f"{option} {path}: no such folder")


def _output_folder(path: str, option: str, overwrite: bool) -> None:
    """An output folder must not hold anything yet (unless --overwrite) and must be writable."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{option} {path}: exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise InputError(f"{option} {path}: exists and is not empty; pass --overwrite to replace it")
    problem = folder_problem(folder.parent)
    if problem:
        raise InputError(f"{option} {path}: {problem}")


# ----------------------------------------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------------------------------------
def build_evaluate_parser() -> argparse.ArgumentParser:
    parser = _parser("evaluate", "Generate for the Shapes prompt set and score prompt adherence per category.")
    add_pipeline_arguments(parser)
    parser.add_argument("--seed", type=seed, default=0, help="seeds the prompt set and the generation")
    parser.add_argument("--limit", type=positive_int, default=None, help="score only the first N prompts")
    parser.add_argument("--batch_size", type=positive_int, default=16)
    parser.add_argument("--grid", default=None,
                        help=f"PNG of 4 samples per category, each with its prompt and the scorer's verdict (default: "
                        f"{DEFAULT_GRID}, numbered -2, -3, ... when taken)")
    parser.add_argument("--json", default=None, help="write the scores here")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --grid or --json file")
    return parser


def run_evaluate(args: argparse.Namespace) -> int:
    # every output is checked before the minutes of generation; the JSON is written first
    _png(args.grid, "--grid")
    grid = args.grid
    if grid is None:
        grid = str(DEFAULT_GRID if args.overwrite else free_path(DEFAULT_GRID))
    _output(grid, "--grid", overwrite=args.overwrite or args.grid is None)
    if args.json is not None:
        _output(args.json, "--json", args.overwrite)
        if Path(args.json).resolve() == Path(grid).resolve():
            raise InputError(f"--json {args.json} and --grid {grid} name the same file")
    from .evaluation import evaluate_pipeline

    evaluate_pipeline(args.model, args.revision, seed=args.seed, limit=args.limit, steps=args.steps,
                      guidance_scale=args.guidance_scale, batch_size=args.batch_size, grid=grid,
                      json_path=args.json, overwrite=args.overwrite or args.grid is None,
                      cache_interval=args.cache_interval)
    return 0


# ----------------------------------------------------------------------------------------------------------
# dataset
# ----------------------------------------------------------------------------------------------------------
def build_dataset_parser() -> argparse.ArgumentParser:
    parser = _parser("dataset", "Write a Shapes training set: OUTPUT_DIR/00000.png, ... and metadata.jsonl (one "
                     '{"file_name", "text"} per line), deterministic for a seed; training captions only.')
    parser.add_argument("output_dir")
    parser.add_argument("--num_images", type=positive_int, default=20000)
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT_DIR")
    return parser


def run_dataset(args: argparse.Namespace) -> int:
    if Path(args.output_dir).exists() and not args.overwrite:
        raise InputError(f"{args.output_dir} already exists; pass --overwrite to replace it")
    _output_folder(args.output_dir, "OUTPUT_DIR", overwrite=True)
    from .dataset import write_dataset

    print(write_dataset(args.output_dir, args.num_images, seed=args.seed, overwrite=args.overwrite))
    return 0


# ----------------------------------------------------------------------------------------------------------
# vae
# ----------------------------------------------------------------------------------------------------------
def build_vae_parser() -> argparse.ArgumentParser:
    parser = _parser("vae", "Train a small AutoencoderKL on the images of a Shapes dataset (single process, CPU "
                     "friendly): reconstruction MSE + kl_weight x KL; then the latent statistics of the training "
                     "images set the config's shift_factor and scaling_factor. See mmdit_diffusers.shapes.autoencoder.")
    parser.add_argument("--train_data_dir", required=True, help="a Shapes dataset (imagefolder with metadata.jsonl)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--init_from", default=None, help="continue training this AutoencoderKL folder")
    parser.add_argument("--resolution", type=positive_int, default=64)
    parser.add_argument("--latent_channels", type=positive_int, default=4)
    parser.add_argument("--block_out_channels", type=positive_int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--crop_size", type=non_negative_int, default=32,
                        help="train on random crops of this side (0: whole images)")
    parser.add_argument("--train_batch_size", type=positive_int, default=32)
    parser.add_argument("--learning_rate", type=positive_float, default=1e-3)
    parser.add_argument("--max_train_steps", type=positive_int, default=1500)
    parser.add_argument("--kl_weight", type=non_negative_float, default=1e-6)
    parser.add_argument("--statistics_images", type=positive_int, default=1024)
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --output_dir")
    return parser


def run_vae(args: argparse.Namespace) -> int:
    factor = 2 ** (len(args.block_out_channels) - 1)
    if args.resolution % factor:
        raise InputError(f"--resolution {args.resolution} is not divisible by the VAE's downsampling factor {factor}")
    if args.crop_size and (args.crop_size > args.resolution or args.crop_size % factor):
        raise InputError(f"--crop_size {args.crop_size} must be at most --resolution and divisible by {factor}")
    if args.init_from is not None and not (Path(args.init_from) / "config.json").is_file():
        raise InputError(f"--init_from {args.init_from}: no config.json, so it is not an AutoencoderKL folder")
    _input_folder(args.train_data_dir, "--train_data_dir")
    _output_folder(args.output_dir, "--output_dir", args.overwrite)
    from .autoencoder import train_autoencoder

    train_autoencoder(args)
    return 0


# ----------------------------------------------------------------------------------------------------------
# text-encoders
# ----------------------------------------------------------------------------------------------------------
def build_text_encoders_parser() -> argparse.ArgumentParser:
    parser = _parser("text-encoders", "Train the Shapes CLIP (contrastively, with hard negatives) and T5 "
                     "(distilled from CLIP) text encoders, then save them frozen with their tokenizers: OUTPUT_DIR "
                     "holds tokenizer/, text_encoder/, tokenizer_3/, text_encoder_3/ and hard_negatives.json. "
                     "See mmdit_diffusers.shapes.text_encoders.")
    parser.add_argument("--train_data_dir", required=True, help="a Shapes dataset (imagefolder with metadata.jsonl)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_train_steps", type=positive_int, default=1000)
    parser.add_argument("--train_batch_size", type=int, default=256, help="at least 2 (the other images are the negatives)")
    parser.add_argument("--learning_rate", type=positive_float, default=2e-3)
    parser.add_argument("--t5_distillation_steps", type=positive_int, default=300)
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --output_dir")
    return parser


def run_text_encoders(args: argparse.Namespace) -> int:
    if args.train_batch_size < 2:
        raise InputError(f"--train_batch_size must be at least 2 (the other images are the negatives), got "
                         f"{args.train_batch_size}")
    _input_folder(args.train_data_dir, "--train_data_dir")
    _output_folder(args.output_dir, "--output_dir", args.overwrite)
    from .text_encoders import train_text_encoders

    print(train_text_encoders(args.train_data_dir, args.output_dir, args.max_train_steps, args.train_batch_size,
                              args.learning_rate, t5_distillation_steps=args.t5_distillation_steps, seed=args.seed))
    return 0


# ----------------------------------------------------------------------------------------------------------
# base
# ----------------------------------------------------------------------------------------------------------
TEXT_PARTS = ("tokenizer", "text_encoder", "tokenizer_3", "text_encoder_3")


def build_base_parser() -> argparse.ArgumentParser:
    parser = _parser("base", "Assemble the untrained Shapes pipeline that `mmdit-diffusers train` starts from: the "
                     "trained text encoders and VAE with a fresh, zero-initialised transformer. See "
                     "mmdit_diffusers.shapes.base_pipeline.")
    parser.add_argument("--text_encoders", required=True, help="folder written by `mmdit-diffusers text-encoders`")
    parser.add_argument("--vae", required=True, help="folder written by `mmdit-diffusers vae`")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --output_dir")
    return parser


def run_base(args: argparse.Namespace) -> int:
    if not (Path(args.vae) / "config.json").is_file():
        raise InputError(f"--vae {args.vae}: no config.json; train the VAE first (mmdit-diffusers vae)")
    missing = [part for part in TEXT_PARTS if not (Path(args.text_encoders) / part).is_dir()]
    if missing:
        raise InputError(f"--text_encoders {args.text_encoders}: no {', '.join(missing)}; train them first "
                         "(mmdit-diffusers text-encoders)")
    _output_folder(args.output_dir, "--output_dir", args.overwrite)
    from .base_pipeline import build_base_pipeline

    print(build_base_pipeline(args.text_encoders, args.vae, args.output_dir, args.seed))
    return 0


# ----------------------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------------------
def build_export_parser() -> argparse.ArgumentParser:
    parser = _parser("export", "Copy a trained pipeline folder to DESTINATION (e.g. pipelines/mmdit-shapes) with "
                     "float16 weights, written beside it and renamed over it at the end. DESTINATION's model card "
                     "(README.md) and sample pictures (*.png) are kept, unless --card / --samples replace them.")
    parser.add_argument("trained", help="the trained pipeline folder (model_index.json)")
    parser.add_argument("destination")
    parser.add_argument("--card", default=None, help="a model card to ship as README.md")
    parser.add_argument("--samples", default=None, help="a sample picture (PNG) to ship beside the card")
    parser.add_argument("--overwrite", action="store_true", help="replace the pipeline that DESTINATION holds")
    return parser


def run_export(args: argparse.Namespace) -> int:
    if not (Path(args.trained) / "model_index.json").is_file():
        raise InputError(f"{args.trained}: no model_index.json, so it is not a trained pipeline folder")
    for option, path in (("--card", args.card), ("--samples", args.samples)):
        if path is not None and not Path(path).is_file():
            raise InputError(f"{option} {path}: no such file")
    _png(args.samples, "--samples")
    destination = Path(args.destination)
    if destination.exists() and not destination.is_dir():
        raise InputError(f"DESTINATION {destination}: exists and is not a folder")
    if (destination / "model_index.json").exists() and not args.overwrite:
        raise InputError(f"DESTINATION {destination} holds a pipeline; pass --overwrite to replace it (its README.md "
                         "and *.png are kept)")
    if destination.resolve() == Path(args.trained).resolve():
        raise InputError(f"DESTINATION {destination} is the trained folder itself; choose another folder")
    problem = folder_problem(destination.parent)
    if problem:
        raise InputError(f"DESTINATION {destination}: {problem}")
    from .export_pipeline import export_pipeline, weight_bytes

    out = export_pipeline(args.trained, args.destination, card=args.card, samples=args.samples)
    print(f"{out} ({weight_bytes(out) / 2**20:.1f} MiB of weights)")
    return 0


# ----------------------------------------------------------------------------------------------------------
# probe
# ----------------------------------------------------------------------------------------------------------
def build_probe_parser() -> argparse.ArgumentParser:
    parser = _parser("probe", "For fresh ground-truth images, compare the flow-matching loss under the true caption "
                     "with the loss under a corrupted one (colours swapped, opposite relation, other count), same "
                     "latents, noise and sigmas. `gap`: mean relative loss increase; `true wins`: share of images "
                     "whose true caption has the lower loss (0.5: the model ignores that part of the text). See "
                     "mmdit_diffusers.shapes.probe.")
    parser.add_argument("--model", default=str(SHIPPED_PIPELINE), help="pipeline folder (default: the shipped one)")
    parser.add_argument("--num_images", type=positive_int, default=160)
    parser.add_argument("--seed", type=seed, default=123)
    return parser


def run_probe(args: argparse.Namespace) -> int:
    from .probe import text_sensitivity
    from .shipped import load_pipeline

    pipe = load_pipeline(args.model)
    print("| probe | loss gap | true caption wins |\n|---|---:|---:|")
    for probe, result in text_sensitivity(pipe, args.num_images, args.seed).items():
        print(f"| {probe} | {result['gap']:+.2%} | {result['true_wins']:.0%} |")
    return 0


COMMANDS = {
    "evaluate": ("score a pipeline on the Shapes prompt set", build_evaluate_parser, run_evaluate),
    "dataset": ("1. write a Shapes training set", build_dataset_parser, run_dataset),
    "vae": ("2. train the Shapes VAE on it", build_vae_parser, run_vae),
    "text-encoders": ("3. train the Shapes CLIP and T5 text encoders on it", build_text_encoders_parser,
                      run_text_encoders),
    "base": ("4. assemble the untrained base pipeline (then: mmdit-diffusers train)", build_base_parser, run_base),
    "export": ("5. copy a trained pipeline into the shipped folder, weights in float16", build_export_parser,
               run_export),
    "probe": ("does a pipeline's transformer read the words that matter? (a loss probe)", build_probe_parser,
              run_probe),
}
