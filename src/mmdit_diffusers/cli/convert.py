"""`mmdit-diffusers convert SRC DST`: a diffusers SD3 / SD3.5 transformer folder -> an MMDiT folder, or back.

    mmdit-diffusers convert ./sd3-medium ./sd3-medium-mmdit              # SD3 -> MMDiT (default)
    mmdit-diffusers convert ./sd3-medium-mmdit ./sd3-again --to sd3      # MMDiT -> SD3
    mmdit-diffusers convert ./sd3-pipeline ./out --dtype bfloat16        # a pipeline folder: uses transformer/

SRC is a model folder (config.json + weights) or a pipeline folder whose `transformer/` holds one. DST is
written atomically: the model is saved into a temporary folder next to DST, which is then renamed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import InputError
from ..files import atomic_directory, config_class_name, folder_problem

HELP = "convert an SD3/SD3.5 transformer folder to MMDiT and back"
PROG = "mmdit-diffusers convert"
DTYPES = ("float32", "float16", "bfloat16")
CLASS_NAMES = {"mmdit": "MMDiTTransformer2DModel", "sd3": "SD3Transformer2DModel"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Convert a diffusers SD3Transformer2DModel folder to an MMDiTTransformer2DModel folder, or back.",
    )
    parser.add_argument("src", type=Path, help="model folder, or a pipeline folder with a transformer/ subfolder")
    parser.add_argument("dst", type=Path, help="output folder (must not exist or be empty, unless --overwrite)")
    parser.add_argument(
        "--to",
        choices=tuple(CLASS_NAMES),
        default="mmdit",
        help="target format: mmdit (SRC holds an SD3 transformer; default) or sd3 (SRC holds an MMDiT)",
    )
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="cast the weights (default: keep SRC's dtype)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists and is not empty")
    return parser


def run(args: argparse.Namespace) -> int:
    return convert(args.src, args.dst, to=args.to, dtype=args.dtype, overwrite=args.overwrite)


def main(argv: list[str] | None = None) -> int:
    from . import run_command

    return run_command("convert", argv)


def convert(src: Path, dst: Path, to: str = "mmdit", dtype: str | None = None, overwrite: bool = False) -> int:
    source_class = CLASS_NAMES["sd3" if to == "mmdit" else "mmdit"]
    model_dir = find_model_folder(Path(src), source_class)
    dst = Path(dst)
    check_destination(dst, overwrite, protected=(Path(src), model_dir))

    import torch

    from ..models.transformer_mmdit import MMDiTTransformer2DModel

    try:
        if to == "mmdit":
            from diffusers import SD3Transformer2DModel

            model = MMDiTTransformer2DModel.from_sd3(SD3Transformer2DModel.from_pretrained(model_dir))
        else:
            model = MMDiTTransformer2DModel.from_pretrained(model_dir).to_sd3()
    except ValueError as error:  # the conversion names the option or tensor it cannot map
        raise InputError(f"cannot convert {model_dir}: {error}") from error
    if dtype is not None:
        model = model.to(getattr(torch, dtype))

    write_atomically(model, dst)
    count = sum(p.numel() for p in model.parameters())
    weights_dtype = next(model.parameters()).dtype
    print(
        f"Converted {source_class} {model_dir} -> {type(model).__name__} {dst} "
        f"({count:,} parameters, {str(weights_dtype).removeprefix('torch.')})"
    )
    return 0


def find_model_folder(src: Path, class_name: str) -> Path:
    """SRC itself or SRC/transformer, whichever holds a config.json naming `class_name`."""
    if not src.exists():
        raise InputError(f"SRC {src} does not exist.")
    if not src.is_dir():
        raise InputError(f"SRC {src} is not a folder.")
    found = {}
    for folder in (src, src / "transformer"):
        name = config_class_name(folder / "config.json")  # None: missing, unreadable or naming no class
        if name is not None:
            found[folder] = name
            if name == class_name:
                return folder
    if found:
        described = ", ".join(f"{folder} holds {name}" for folder, name in found.items())
        # the --to that reads each known class: an SD3 model converts to mmdit, an MMDiT to sd3
        to_for = {CLASS_NAMES["sd3"]: "mmdit", CLASS_NAMES["mmdit"]: "sd3"}
        hint = next((f" (to convert it, pass --to {to_for[n]})" for n in found.values() if n in to_for), "")
        raise InputError(f"expected a {class_name} in {src} or {src / 'transformer'}, but {described}{hint}.")
    raise InputError(
        f"{src} holds no {class_name}: neither {src / 'config.json'} nor {src / 'transformer' / 'config.json'} "
        "describes a diffusers model."
    )


def check_destination(dst: Path, overwrite: bool, protected: tuple[Path, ...]) -> None:
    resolved = dst.resolve()
    if any(resolved == p.resolve() or p.resolve().is_relative_to(resolved) for p in protected):
        raise InputError(f"DST {dst} would replace the source; choose another folder.")
    if dst.exists() and not dst.is_dir():
        raise InputError(f"DST {dst} exists and is not a folder.")
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise InputError(f"DST {dst} exists and is not empty; pass --overwrite to replace it.")
    problem = folder_problem(dst.parent)
    if problem:
        raise InputError(f"DST {dst}: {problem}.")


def write_atomically(model, dst: Path) -> None:
    """save_pretrained into a staging folder beside DST that becomes DST when complete (an old DST is replaced
    only then)."""
    with atomic_directory(dst) as staging:
        model.save_pretrained(staging, safe_serialization=True)


if __name__ == "__main__":
    sys.exit(main())
