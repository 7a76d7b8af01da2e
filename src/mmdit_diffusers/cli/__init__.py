"""`mmdit-diffusers` console script: one subcommand per module, each with its own `main(argv)`."""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, one-line help). Modules are imported only when their command runs,
# so `mmdit-diffusers --help` stays fast.
COMMANDS = {
    "generate": ("mmdit_diffusers.cli.generate", "generate images from a prompt (default: the shipped Shapes pipeline)"),
    "evaluate": ("mmdit_diffusers.cli.evaluate", "score a pipeline on the Shapes prompt set"),
    "train": ("mmdit_diffusers.train", "train or fine-tune with rectified flow (single process)"),
    "convert": ("mmdit_diffusers.cli.convert", "convert an SD3/SD3.5 transformer folder to MMDiT and back"),
    "push": ("mmdit_diffusers.cli.push", "push a model or pipeline folder to the Hugging Face Hub"),
}


def _usage() -> str:
    lines = ["usage: mmdit-diffusers COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `mmdit-diffusers COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"mmdit-diffusers: unknown command {command!r}; expected one of {', '.join(COMMANDS)}.", file=sys.stderr)
        print(_usage(), file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
