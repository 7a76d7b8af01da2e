"""Rectified-flow text-to-image training of an MMDiT pipeline.

    accelerate launch -m mmdit_diffusers.train --config configs/train_tiny.yaml [--key value ...]
    mmdit-diffusers train --config configs/train_tiny.yaml            # single process

See docs/training.md. The work is done in `mmdit_diffusers.training`; this module only parses, runs and turns
the expected failures into `error: ...` on stderr: bad input (exit status 2, before any training step), a
diverged loss (exit status 1, the latest checkpoint kept) and a failed Hub push at the end (exit status 1, the
trained model kept in --output_dir).
"""

from __future__ import annotations

import os
import sys


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def main(argv: list[str] | None = None) -> int:
    from .training.args import parse_args
    from .training.errors import TrainingConfigError, TrainingDivergedError

    try:
        args = parse_args(argv)
    except TrainingConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        print("Run with --help for the options.", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)

    from .training.loop import train

    try:
        train(args)
    except TrainingConfigError as e:
        if _is_main_process():
            print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDivergedError as e:
        if _is_main_process():
            print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        from .hub import HubError

        if not isinstance(e, HubError):
            raise
        if _is_main_process():
            print(f"error: the push to the Hub failed: {e} The trained model is saved in {args.output_dir}; push it "
                  f"later with `mmdit-diffusers push {args.output_dir} {args.hub_model_id}`.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; resume with --resume_from_checkpoint latest", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
