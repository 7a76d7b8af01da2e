"""`mmdit-diffusers push PATH REPO_ID`: push a saved pipeline, transformer or LoRA folder to the Hugging Face Hub.

    mmdit-diffusers push out/pipeline me/my-mmdit --private --revision v1 --commit-message "step 5000"

PATH is a folder written by `save_pretrained` (a pipeline: model_index.json; an MMDiTTransformer2DModel:
config.json) or by `save_lora_weights` (pytorch_lora_weights.safetensors). The repo and the branch are created
when missing; the model card (README.md) is generated, or merged into the repo's existing card. Prints the
commit URL. Failures (a bad folder, a refusal or an unreachable Hub) print `error: ...` and exit with status 2.
The token is never printed.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import InputError

HELP = "push a model or pipeline folder to the Hugging Face Hub"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmdit-diffusers push",
        description="Push a saved MMDiT pipeline, transformer or LoRA folder to the Hugging Face Hub, with a model card.",
    )
    parser.add_argument("path", metavar="PATH", help="the saved folder (pipeline, transformer or LoRA)")
    parser.add_argument("repo_id", metavar="REPO_ID", help="namespace/name on the Hub (created when missing)")
    parser.add_argument("--private", action="store_true", help="create the repo as private (no effect on an existing repo)")
    parser.add_argument("--revision", metavar="BRANCH", default=None,
                        help="branch to push to (created from main when missing); default main")
    parser.add_argument("--commit-message", metavar="MSG", default=None, help="the commit message")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument("--token", metavar="TOKEN", default=None,
                        help="a write token; default HF_TOKEN or the `hf auth login` token (prefer those: a token on "
                             "the command line is visible to other users of the machine)")
    card = parser.add_argument_group("model card")
    card.add_argument("--license", default=None, help="license id for the card metadata (e.g. apache-2.0)")
    card.add_argument("--base-model", default=None, help="the base model repo id (for fine-tunes and LoRAs)")
    card.add_argument("--dataset", action="append", default=None, metavar="DATASET", help="a training dataset (repeatable)")
    card.add_argument("--tag", action="append", default=None, metavar="TAG", help="an extra tag (repeatable)")
    card.add_argument("--sample", action="append", nargs=2, default=None, metavar=("IMAGE", "PROMPT"),
                      help="a sample image and its prompt, shown in the card and its widget (repeatable)")
    return parser


def run(args: argparse.Namespace) -> int:
    from ..hub import HubError, push_folder

    card_data = {
        "license": args.license,
        "base_model": args.base_model,
        "datasets": args.dataset,
        "tags": args.tag,
    }
    card_data = {key: value for key, value in card_data.items() if value}
    samples = [(prompt, image) for image, prompt in (args.sample or [])]
    for _, image in samples:  # before any network traffic
        if not os.path.isfile(image):
            raise InputError(f"--sample {image}: no such image file")
    try:
        commit = push_folder(
            args.path,
            args.repo_id,
            token=args.token,
            private=True if args.private else None,
            revision=args.revision,
            commit_message=args.commit_message,
            create_pr=args.create_pr,
            card_data=card_data,
            sample_images=samples,
        )
    except (HubError, ValueError, OSError) as error:  # a refused push is, to this command, input to fix
        message = str(error).replace(args.token, "***") if args.token else str(error)
        raise InputError(message) from error
    except KeyboardInterrupt:
        print("error: interrupted; nothing was committed unless the commit URL was printed", file=sys.stderr)
        return 130
    if args.create_pr and getattr(commit, "pr_url", None):
        print(f"opened pull request {commit.pr_url}")
    print(f"pushed {args.path} to {commit.repo_url.repo_id if getattr(commit, 'repo_url', None) else args.repo_id}"
          f"{'@' + args.revision if args.revision else ''}: {commit.commit_url}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from . import run_command

    return run_command("push", argv)


if __name__ == "__main__":
    sys.exit(main())
