"""`mmdit-diffusers COMMAND`: the one command-line entry point.

Every command is a parser (`build_parser()`, or `parse_args(argv)` where a command reads more than its command
line) and a `run(args)` function. The library's commands live in this package (`generate`, `train`, `convert`,
`push`); the Shapes recipe's (`evaluate` and the steps of `scripts/train_shapes.sh`) in
`mmdit_diffusers.shapes.commands`, listed here. Parsers come from modules that import neither torch, diffusers nor
transformers, so `--help` and usage errors answer at once; `run` imports what it needs.

Bad input is one exception, `mmdit_diffusers.errors.InputError`, turned here (and only here) into
`error: <message>` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, NamedTuple

from ..errors import InputError

EXIT_BAD_INPUT = 2


class Command(NamedTuple):
    help: str
    parse_args: Callable[[list[str]], argparse.Namespace]
    run: Callable[[argparse.Namespace], int | None]


# the library's commands: module -> HELP, build_parser() (or parse_args(argv)), run(args)
LIBRARY_COMMANDS = {
    "generate": "mmdit_diffusers.cli.generate",
    "train": "mmdit_diffusers.cli.train",
    "convert": "mmdit_diffusers.cli.convert",
    "push": "mmdit_diffusers.cli.push",
}


def commands() -> dict[str, Command]:
    """Every command by name: the library's, then the Shapes recipe's."""
    from ..shapes.commands import COMMANDS as RECIPE_COMMANDS

    table = {}
    for name, module_name in LIBRARY_COMMANDS.items():
        module = importlib.import_module(module_name)
        parse = getattr(module, "parse_args", None) or _parse_with(module.build_parser)
        table[name] = Command(module.HELP, parse, module.run)
    for name, (help_, build_parser, run) in RECIPE_COMMANDS.items():
        table[name] = Command(help_, _parse_with(build_parser), run)
    return table


def _parse_with(build_parser) -> Callable[[list[str]], argparse.Namespace]:
    return lambda argv: build_parser().parse_args(argv)


def usage(table: dict[str, Command]) -> str:
    from ..shapes.commands import COMMANDS as RECIPE_COMMANDS

    lines = ["usage: mmdit-diffusers COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<14} {command.help}" for name, command in table.items() if name not in RECIPE_COMMANDS]
    lines += ["", "the Shapes recipe (scripts/train_shapes.sh runs its steps in this order):"]
    lines += [f"  {name:<14} {command.help}" for name, command in table.items() if name in RECIPE_COMMANDS]
    lines += ["", "Run `mmdit-diffusers COMMAND --help` for a command's options."]
    return "\n".join(lines)


def run_command(name: str, argv: list[str] | None = None) -> int:
    """Parse `argv` for command `name` and run it; returns the exit status (argparse's for --help and usage
    errors, 2 for an `InputError`, the command's own otherwise)."""
    command = commands()[name]
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        try:
            args = command.parse_args(argv)
        except SystemExit as exit_:  # --help (0) or a usage error (2), already printed by argparse
            return exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
        return int(command.run(args) or 0)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    table = commands()
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(table))
        return 0
    name, rest = argv[0], argv[1:]
    if name not in table:
        print(f"error: unknown command {name!r}; expected one of {', '.join(table)}.", file=sys.stderr)
        print(usage(table), file=sys.stderr)
        return EXIT_BAD_INPUT
    return run_command(name, rest)


if __name__ == "__main__":
    sys.exit(main())
