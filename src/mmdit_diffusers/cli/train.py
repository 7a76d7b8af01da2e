"""`mmdit-diffusers train`: rectified-flow text-to-image training of an MMDiT pipeline.

    accelerate launch -m mmdit_diffusers.train --config configs/train_tiny.yaml [--key value ...]
    mmdit-diffusers train --config configs/train_tiny.yaml            # single process

See docs/training.md. `mmdit_diffusers.training` parses (`training.args`) and trains; this command then writes
the model card and, with --push_to_hub, pushes the folder (main process only). Expected failures are one line
`error: ...` on stderr: bad input (exit status 2, before any training step), a diverged loss (exit status 1, the
latest checkpoint kept) and a failed Hub push at the end (exit status 1, the trained model kept in --output_dir).
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import InputError

HELP = "train or fine-tune with rectified flow (accelerate launch -m mmdit_diffusers.train for several processes)"


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line after the --config YAML (`mmdit_diffusers.training.args`); bad input is an `InputError`."""
    from ..training.args import parse_args as parse_training_args

    return parse_training_args(argv)


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def run(args: argparse.Namespace) -> int:
    from ..training import TrainingDivergedError, train

    try:
        result = train(args)
    except InputError:
        if not _is_main_process():  # every process has the error; one prints it
            return 2
        raise
    except TrainingDivergedError as err:
        if _is_main_process():
            print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; resume with --resume_from_checkpoint latest", file=sys.stderr)
        return 130
    if not _is_main_process():
        return 0

    from ..hub import HubError, push_folder, write_model_card

    write_model_card(result.output_dir, card_data=result.card_data, sample_images=result.sample_images)
    if args.push_to_hub:
        steps = result.card_data.get("training", {}).get("optimizer steps")
        try:
            push_folder(
                result.output_dir, args.hub_model_id, private=args.hub_private or None, ignore_patterns=result.ignore_patterns,
                card_data=result.card_data, sample_images=result.sample_images,
                commit_message=f"mmdit_diffusers.train: {'LoRA' if args.use_lora else 'pipeline'} after {steps} steps",
            )
        except HubError as err:
            print(f"error: the push to the Hub failed: {err} The trained model is saved in {result.output_dir}; push "
                  f"it later with `mmdit-diffusers push {result.output_dir} {args.hub_model_id}`.", file=sys.stderr)
            return 1
        print(f"pushed {result.output_dir} to the Hub as {args.hub_model_id}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    from . import run_command

    return run_command("train", argv)


if __name__ == "__main__":
    sys.exit(main())
