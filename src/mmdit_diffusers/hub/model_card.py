"""The model card (README.md) of a saved MMDiT pipeline, transformer or LoRA: the project's one card writer.

    write_model_card("out/pipeline", card_data={"training": {...}}, sample_images=[(prompt, "grid.png")])

`build_model_card` makes the `huggingface_hub.ModelCard`; `write_model_card` writes it into a folder, and
`push_folder` uploads it with the folder. A card has

- metadata (`ModelCardData`): `library_name: diffusers` and the tags `mmdit`, `mmdit-diffusers`, `text-to-image`,
  `diffusers` (+ `lora`), both through diffusers' `populate_model_card`; `pipeline_tag: text-to-image`,
  `license`, `base_model`, `datasets`, `widget` and any other key of `card_data`;
- a body rendered from the Jinja2 template `model_card_template.md` (package data beside this module; the
  environment variable `MMDIT_MODEL_CARD_TEMPLATE` names another file): the architecture and parameter counts read
  from the folder (config.json and the safetensors headers: no weights are loaded), the loading code, training
  details and scores when given, and limitations.

An existing card is updated, not replaced: its metadata keys are kept and ours updated (tags and datasets are
merged), its text is kept, and only the generated section between `GENERATED_START` and `GENERATED_END` is
rewritten (appended when the card has none). Without new samples, the card's `widget` stays its samples.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..files import atomic_file, write_text_atomically

__all__ = [
    "BASE_TAGS",
    "GENERATED_END",
    "GENERATED_START",
    "TEMPLATE_ENV",
    "build_model_card",
    "count_safetensors_parameters",
    "describe_folder",
    "detect_folder_kind",
    "png_bytes",
    "write_model_card",
]

GENERATED_START = "<!-- mmdit-diffusers:generated:start -->"
GENERATED_END = "<!-- mmdit-diffusers:generated:end -->"
BASE_TAGS = ["mmdit", "mmdit-diffusers", "text-to-image", "diffusers"]
# `card_data` keys that fill the body; every other key is card metadata (YAML).
TEMPLATE_FIELDS = ("model_name", "description", "training", "scores", "limitations", "prompt")
MODEL_CLASS = "MMDiTTransformer2DModel"
TEMPLATE_ENV = "MMDIT_MODEL_CARD_TEMPLATE"
README = "README.md"
IMAGES_DIR = "images"
# diffusers' push_to_hub / save_pretrained(push_to_hub=True) boilerplate card: not worth keeping.
_DIFFUSERS_BOILERPLATE = "This is the model card of a 🧨 diffusers model that has been pushed on the Hub."


# ---------------------------------------------------------------------------------------------------------------
# Reading the folder
# ---------------------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _safetensors_files(folder: Path, pattern: str) -> Iterator[Any]:
    """Each readable safetensors file of `folder` matching `pattern` (not recursive), opened with `safe_open`:
    its header (tensor names, shapes, metadata) is read, its tensors are not."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(folder.glob(pattern)) if folder.is_dir() else []:
        try:
            with safe_open(path, framework="numpy") as f:
                yield f
        except (OSError, SafetensorError):
            continue


def count_safetensors_parameters(folder: str | os.PathLike, pattern: str = "*.safetensors") -> int | None:
    """Number of parameters in the `*.safetensors` files of `folder` (not recursive), from their headers.
    A tensor name in several files (weight variants, fp16 + fp32) counts once. None when there are none."""
    shapes: dict[str, list[int]] = {}
    for f in _safetensors_files(Path(folder), pattern):
        for name in f.keys():
            shapes.setdefault(name, f.get_slice(name).get_shape())
    return sum(math.prod(shape) for shape in shapes.values()) if shapes else None


def human_count(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def detect_folder_kind(folder: str | os.PathLike) -> str:
    """"pipeline" (model_index.json), "model" (config.json of an MMDiTTransformer2DModel) or "lora"
    (`*lora*.safetensors`, no config). Raises ValueError for anything else."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder: pass a folder written by save_pretrained / save_lora_weights")
    if (folder / "model_index.json").is_file():
        return "pipeline"
    if (folder / "config.json").is_file():
        config = _read_json(folder / "config.json")
        if config is None:
            raise ValueError(f"{folder}/config.json is not valid JSON")
        class_name = config.get("_class_name")
        if class_name != MODEL_CLASS:
            raise ValueError(
                f"{folder}/config.json is for {class_name or 'an unknown class'}, not {MODEL_CLASS}: push an "
                "MMDiTTransformer2DModel folder, an MMDiTPipeline folder (model_index.json) or a LoRA folder"
            )
        return "model"
    if any("lora" in p.name.lower() for p in folder.glob("*.safetensors")):
        return "lora"
    raise ValueError(
        f"{folder} is not a saved model, pipeline or LoRA folder: expected model_index.json (pipeline), "
        "config.json (MMDiTTransformer2DModel) or pytorch_lora_weights.safetensors (LoRA)"
    )


def _architecture(config: dict | None) -> dict | None:
    if not config:
        return None
    hidden, heads = config.get("hidden_size"), config.get("num_heads")
    patch = config.get("patch_size") or 2
    return {
        "depth": config.get("depth"),
        "hidden_size": hidden,
        "num_heads": heads,
        "head_dim": hidden // heads if hidden and heads else None,
        "mlp_ratio": config.get("mlp_ratio"),
        "patch_size": patch,
        "in_channels": config.get("in_channels") or (config.get("img_dim", 0) // patch**2 or None),
        "txt_dim": config.get("txt_dim"),
        "cond_dim": config.get("cond_dim") or hidden,
        "txt_tokens": config.get("txt_tokens"),
        "img_tokens": config.get("img_tokens"),
        "qk_norm": config.get("qk_norm"),
        "dual_attention_layers": list(config.get("dual_attention_layers") or []),
        "use_text_attention_mask": config.get("use_text_attention_mask", True),
    }


def _lora_info(folder: Path) -> dict:
    """Rank, alpha and target modules from the adapter config that `save_lora_weights` stores as metadata."""
    info: dict[str, Any] = {"rank": None, "alpha": None, "target_modules": []}
    for f in _safetensors_files(folder, "*.safetensors"):
        try:
            adapter = json.loads((f.metadata() or {}).get("lora_adapter_metadata") or "{}")
        except ValueError:
            continue
        for key, value in adapter.items():
            name = key.rsplit(".", 1)[-1]
            if name == "r":
                info["rank"] = value
            elif name == "lora_alpha":
                info["alpha"] = value
            elif name == "target_modules" and value:
                info["target_modules"] = sorted(value) if isinstance(value, (list, tuple)) else [str(value)]
    return info


def describe_folder(folder: str | os.PathLike, kind: str | None = None) -> dict:
    """What the card shows about a saved folder: kind, architecture, parameter counts, components."""
    folder = Path(folder)
    kind = kind or detect_folder_kind(folder)
    params: dict[str, Any] = {}
    components = []
    arch = None
    lora = {"rank": None, "alpha": None, "target_modules": []}
    if kind == "model":
        arch = _architecture(_read_json(folder / "config.json"))
        params["transformer"] = count_safetensors_parameters(folder)
    elif kind == "pipeline":
        index = _read_json(folder / "model_index.json") or {}
        arch = _architecture(_read_json(folder / "transformer" / "config.json"))
        total = 0
        for name, entry in index.items():
            if name.startswith("_") or not isinstance(entry, (list, tuple)) or len(entry) != 2 or entry[0] is None:
                continue
            count = count_safetensors_parameters(folder / name)
            total += count or 0
            if name == "transformer":
                params["transformer"] = count
            components.append({"name": name, "library": entry[0], "class_name": entry[1],
                               "params_h": human_count(count) if count is not None else "-"})
        params["total"] = total or None
    else:
        lora = _lora_info(folder)
        params["lora"] = count_safetensors_parameters(folder, "*lora*.safetensors")
    for key in ("transformer", "total", "lora"):
        params.setdefault(key, None)
        params[f"{key}_h"] = human_count(params[key])
    return {"kind": kind, "arch": arch, "params": params, "components": components, "lora": lora}


# ---------------------------------------------------------------------------------------------------------------
# Template
# ---------------------------------------------------------------------------------------------------------------
def template_source() -> str:
    """The card template: the file named by `$MMDIT_MODEL_CARD_TEMPLATE`, else `model_card_template.md` shipped
    with this package."""
    if os.environ.get(TEMPLATE_ENV):
        return Path(os.environ[TEMPLATE_ENV]).read_text(encoding="utf-8")
    return resources.files(__package__).joinpath("model_card_template.md").read_text(encoding="utf-8")


def render_body(context: dict) -> str:
    import jinja2

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                             undefined=jinja2.ChainableUndefined, autoescape=False)
    env.filters["cell"] = lambda value: str(value).replace("|", "\\|").replace("\n", " ")
    text = env.from_string(template_source()).render(**context)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Merging with an existing card
# ---------------------------------------------------------------------------------------------------------------
def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _merge_metadata(existing: dict, ours: dict, defaults: dict) -> dict:
    """`existing` keys are kept; `ours` replace them, except `datasets`, which are merged (existing first);
    `defaults` only fill missing keys."""
    merged = dict(existing)
    for key, value in defaults.items():
        if merged.get(key) in (None, "", []):
            merged[key] = value
    for key, value in ours.items():
        if key == "datasets" and value is not None:
            value = list(dict.fromkeys(_as_list(existing.get(key)) + _as_list(value)))
        if value is not None:
            merged[key] = value
    return merged


def _generated_block(text: str) -> str | None:
    start, end = text.find(GENERATED_START), text.find(GENERATED_END)
    if start < 0 or end < start:
        return None
    return text[start : end + len(GENERATED_END)]


def _merge_body(existing_text: str | None, rendered: str) -> str:
    """The card body: `rendered` for a new card; else `existing_text` with its generated block replaced by the
    one in `rendered` (or the block appended when it has none)."""
    if not existing_text or not existing_text.strip():
        return rendered
    block = _generated_block(rendered)
    if block is None:
        return existing_text
    old = _generated_block(existing_text)
    if old is not None:
        return existing_text.replace(old, block, 1)
    return existing_text.rstrip() + "\n\n" + block + "\n"


def _parse_existing(text: str, repo_id: str):
    """The existing card; a ValueError that says what to fix when its YAML metadata cannot be read (writing on
    would throw the owner's metadata away)."""
    import yaml
    from huggingface_hub import ModelCard

    try:
        return ModelCard(text, ignore_metadata_errors=True)
    except (yaml.YAMLError, ValueError) as error:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"the existing model card (README.md) of {repo_id} has invalid YAML metadata ({detail}): fix the block "
            "between the `---` lines (on the Hub, or in the pushed folder for a new repo), then push again"
        ) from error


def build_model_card(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    existing: str | None = None,
    card_data: dict | None = None,
    samples: list[dict] | None = None,
    kind: str | None = None,
):
    """The `huggingface_hub.ModelCard` for `folder` published as `repo_id` (a repo id, or the folder's path).

    Args:
        folder: The saved folder (pipeline, model or LoRA).
        existing: The current README.md text (the repo's, or the folder's), or None.
        card_data: Metadata keys (`license`, `base_model`, `datasets`, `tags`, `language`, any other YAML key) and
            the body fields `TEMPLATE_FIELDS`: `model_name`, `description`, `training` (dict), `scores`
            (dict), `limitations`, `prompt` (for the code example; default: the first sample's).
        samples: `[{"text": prompt, "url": "images/sample_0.png"}, ...]`, URLs relative to the card: they become
            the `widget` metadata and a Samples section. Default: the existing card's widget.
    """
    from diffusers.utils.hub_utils import populate_model_card
    from huggingface_hub import ModelCard, ModelCardData

    card_data = dict(card_data or {})
    body_fields = {key: card_data.pop(key) for key in TEMPLATE_FIELDS if key in card_data}
    info = describe_folder(folder, kind)
    kind = info["kind"]

    if existing is not None and _DIFFUSERS_BOILERPLATE in existing and "[More Information Needed]" in existing:
        existing = None
    old_card = _parse_existing(existing, repo_id) if existing else None
    old_metadata = old_card.data.to_dict() if old_card is not None else {}

    tags = BASE_TAGS + (["lora"] if kind == "lora" else []) + _as_list(card_data.pop("tags", None))
    ours = {"pipeline_tag": "text-to-image", **card_data}
    if samples:
        ours["widget"] = [{"text": s["text"], "output": {"url": s["url"]}} for s in samples]
    defaults = {"license": "other" if ours.get("base_model") else "apache-2.0"}
    metadata = _merge_metadata(old_metadata, ours, defaults)
    samples = samples or [{"text": w["text"], "url": w["output"]["url"]} for w in _as_list(metadata.get("widget"))
                          if isinstance(w, dict) and w.get("text") and isinstance(w.get("output"), dict)
                          and w["output"].get("url")]

    prompt = body_fields.get("prompt") or (samples[0]["text"] if samples else None)
    context = {
        **info,
        "repo_id": repo_id,
        "model_name": body_fields.get("model_name") or repo_id.rstrip("/").split("/")[-1],
        "class_name": {"pipeline": "MMDiTPipeline", "model": MODEL_CLASS, "lora": "LoRA"}[kind],
        "base_model": (_as_list(metadata.get("base_model")) or [None])[0],
        "datasets": _as_list(metadata.get("datasets")),
        "license": metadata.get("license"),
        "prompt": str(prompt).replace('"', "'") if prompt else None,
        "training": dict(body_fields.get("training") or {}),
        "scores": dict(body_fields.get("scores") or {}),
        "samples": samples,
        "description": body_fields.get("description"),
        "limitations": body_fields.get("limitations"),
    }
    body = _merge_body(old_card.text if old_card is not None else None, render_body(context))
    card = ModelCard(f"---\n{ModelCardData(**metadata).to_yaml()}\n---\n\n{body.lstrip()}")
    # diffusers' own card defaults: library_name "diffusers" when unset, and our tags after the owner's.
    return populate_model_card(card, tags=[tag for tag in dict.fromkeys(tags) if tag not in (card.data.tags or [])])


# ---------------------------------------------------------------------------------------------------------------
# Writing it into a folder
# ---------------------------------------------------------------------------------------------------------------
def png_bytes(image) -> bytes:
    """A sample image (PIL image, or image file) as PNG bytes; a .png file as it is."""
    if isinstance(image, (str, os.PathLike)) and str(image).lower().endswith(".png"):
        return Path(image).read_bytes()
    from PIL import Image

    buffer = io.BytesIO()
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as opened:
            opened.save(buffer, format="PNG")
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def _folder_samples(folder: Path, sample_images) -> list[dict]:
    """Card samples for `[(prompt, PIL image or image path), ...]`: an image file inside `folder` is referenced
    where it is; any other image is written to `folder/images/sample_<i>.png` (where `push_folder` puts them)."""
    samples = []
    for i, (prompt, image) in enumerate(sample_images or ()):
        if isinstance(image, (str, os.PathLike)) and Path(image).resolve().is_relative_to(folder.resolve()):
            url = Path(image).resolve().relative_to(folder.resolve()).as_posix()
        else:
            url = f"{IMAGES_DIR}/sample_{i}.png"
            with atomic_file(folder / url) as f:
                f.write(png_bytes(image))
        samples.append({"text": str(prompt), "url": url})
    return samples


def write_model_card(
    folder: str | os.PathLike,
    card_data: dict | None = None,
    repo_id: str | None = None,
    sample_images: Iterable | None = None,
) -> Path:
    """Write (or update) `folder/README.md`, the model card of a saved pipeline, transformer or LoRA folder.

    Args:
        folder: A folder written by `save_pretrained` / `save_lora_weights`.
        card_data: Card metadata and body fields; see `build_model_card`.
        repo_id: The Hub repo the code example loads; default the folder's path.
        sample_images: `[(prompt, PIL image or image path), ...]`, shown in the card and as its `widget`.

    Returns the path of the card. An existing README.md is merged, as `build_model_card` describes.
    """
    folder = Path(folder)
    kind = detect_folder_kind(folder)
    path = folder / README
    existing = path.read_text(encoding="utf-8") if path.is_file() else None
    samples = _folder_samples(folder, sample_images)
    if repo_id is None:
        card_data = {"model_name": folder.resolve().name, **(card_data or {})}
    card = build_model_card(folder, repo_id or str(folder), existing=existing, card_data=card_data, samples=samples,
                            kind=kind)
    write_text_atomically(path, str(card))
    return path
