"""Copy a trained pipeline folder into the repository as the shipped default, weights in float16.

    python -m mmdit_diffusers.shapes.export_pipeline TRAINED_DIR pipelines/mmdit-shapes

The folder's README.md is the model card `model_cards/mmdit-shapes.md` when that file exists. The copy is written
next to the destination and renamed over it at the end, so the destination is never half written.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

MAX_WEIGHT_BYTES = 40 * 2**20  # the shipped pipeline's budget for all weights together
CARD = Path(__file__).resolve().parents[3] / "model_cards" / "mmdit-shapes.md"
SAMPLES = CARD.with_name("mmdit-shapes-samples.png")  # the card's sample grid, shipped beside it


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


def export_pipeline(trained: str | Path, destination: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    from ..pipelines import MMDiTPipeline

    pipe = MMDiTPipeline.from_pretrained(trained, dtype=torch.float32).to(dtype)
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=destination.parent))
    try:
        pipe.save_pretrained(staging)
        _drop_loading_flags(staging)
        if CARD.is_file():
            shutil.copyfile(CARD, staging / "README.md")
        if SAMPLES.is_file():
            shutil.copyfile(SAMPLES, staging / SAMPLES.name)
        size = weight_bytes(staging)
        if size > MAX_WEIGHT_BYTES:
            raise ValueError(f"the weights take {size / 2**20:.1f} MiB, over the {MAX_WEIGHT_BYTES / 2**20:.0f} MiB budget")
        staging.chmod(0o755)  # mkdtemp makes it private
        if destination.exists():
            shutil.rmtree(destination)
        staging.rename(destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return destination


def _drop_loading_flags(folder: Path) -> None:
    """transformers saves the `local_files_only` a tokenizer was loaded with (true under HF_HUB_OFFLINE=1) into its
    tokenizer_config.json; a shipped folder should not pin how its users load it."""
    for config in folder.glob("tokenizer*/tokenizer_config.json"):
        values = json.loads(config.read_text())
        if values.pop("local_files_only", None) is not None:
            config.write_text(json.dumps(values, indent=2, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or not (Path(argv[0]) / "model_index.json").is_file():
        print("usage: python -m mmdit_diffusers.shapes.export_pipeline TRAINED_PIPELINE_DIR DESTINATION", file=sys.stderr)
        return 2
    out = export_pipeline(*argv)
    print(f"{out} ({weight_bytes(out) / 2**20:.1f} MiB of weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
