"""Model cards for pushed MMDiT models, pipelines and LoRAs.

`build_model_card(folder, repo_id, existing=..., card_data=...)` returns the `huggingface_hub.ModelCard` to upload:

- metadata (`ModelCardData`): `library_name: diffusers`, `pipeline_tag: text-to-image`, tags (`mmdit`,
  `mmdit-diffusers`, `text-to-image`, `diffusers`, + `lora`), `license`, `base_model`, `datasets`, `widget`;
- body: `model_cards/template.md` (Jinja2) with the architecture and parameter counts read from the folder
  (config.json and the safetensors headers: no weights are loaded), the loading code, training details and
  scores when given, and limitations.

An existing card (the repo's README.md, or one in the folder) is updated, not replaced: its metadata keys are
kept and ours updated (tags are merged), its text is kept, and only the generated section between
`GENERATED_START` and `GENERATED_END` is rewritten (appended when the card has none).
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Any

__all__ = [
    "BASE_TAGS",
    "GENERATED_END",
    "GENERATED_START",
    "TEMPLATE_FIELDS",
    "build_model_card",
    "count_safetensors_parameters",
    "detect_folder_kind",
    "merge_metadata",
    "merge_body",
    "template_path",
]

GENERATED_START = "<!-- mmdit-diffusers:generated:start -->"
GENERATED_END = "<!-- mmdit-diffusers:generated:end -->"
BASE_TAGS = ["mmdit", "mmdit-diffusers", "text-to-image", "diffusers"]
# `card_data` keys that fill the body; every other key is card metadata (YAML).
TEMPLATE_FIELDS = ("model_name", "description", "training", "scores", "limitations", "prompt", "sample_images")
DEFAULT_PROMPT = "a red circle left of a blue square"
MODEL_CLASS = "MMDiTTransformer2DModel"
TEMPLATE_ENV = "MMDIT_MODEL_CARD_TEMPLATE"
# diffusers' push_to_hub / save_pretrained(push_to_hub=True) boilerplate card: not worth keeping.
_DIFFUSERS_BOILERPLATE = "This is the model card of a 🧨 diffusers model that has been pushed on the Hub."

# Used only when model_cards/template.md is not on disk (an installed wheel without the repo checkout).
_FALLBACK_TEMPLATE = """# {{ model_name }}

<!-- mmdit-diffusers:generated:start -->
## How to use

```python
from mmdit_diffusers import MMDiTPipeline, MMDiTTransformer2DModel
{% if kind == "lora" %}
pipe = MMDiTPipeline.from_pretrained("{{ base_model or 'BASE_PIPELINE' }}")
pipe.load_lora_weights("{{ repo_id }}")
{% elif kind == "model" %}
transformer = MMDiTTransformer2DModel.from_pretrained("{{ repo_id }}")
{% else %}
pipe = MMDiTPipeline.from_pretrained("{{ repo_id }}")
{% endif %}
```
{% if arch %}

Architecture: depth {{ arch.depth }}, hidden size {{ arch.hidden_size }}, {{ arch.num_heads }} heads{% if params.transformer %}, {{ params.transformer_h }} transformer parameters{% endif %}.
{% endif %}
<!-- mmdit-diffusers:generated:end -->
"""


# ---------------------------------------------------------------------------------------------------------------
# Reading the folder
# ---------------------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


def count_safetensors_parameters(folder: str | os.PathLike, pattern: str = "*.safetensors") -> int | None:
    """Number of parameters in the `*.safetensors` files of `folder` (not recursive), from their headers.
    A tensor name in several files (weight variants, fp16 + fp32) counts once. None when there are none."""
    shapes: dict[str, list[int]] = {}
    files = sorted(Path(folder).glob(pattern)) if Path(folder).is_dir() else []
    for path in files:
        try:
            header = _safetensors_header(path)
        except (OSError, ValueError, struct.error):
            continue
        for name, info in header.items():
            if name != "__metadata__" and isinstance(info, dict) and "shape" in info:
                shapes.setdefault(name, info["shape"])
    if not shapes:
        return None
    total = 0
    for shape in shapes.values():
        count = 1
        for dim in shape:
            count *= int(dim)
        total += count
    return total


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
    config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else None
    if config is not None:
        class_name = config.get("_class_name")
        if class_name != MODEL_CLASS:
            raise ValueError(
                f"{folder}/config.json is for {class_name or 'an unknown class'}, not {MODEL_CLASS}: push an "
                "MMDiTTransformer2DModel folder, an MMDiTPipeline folder (model_index.json) or a LoRA folder"
            )
        return "model"
    if (folder / "config.json").is_file():
        raise ValueError(f"{folder}/config.json is not valid JSON")
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
    in_channels = config.get("in_channels") or (config.get("img_dim", 0) // patch**2 or None)
    return {
        "depth": config.get("depth"),
        "hidden_size": hidden,
        "num_heads": heads,
        "head_dim": hidden // heads if hidden and heads else None,
        "mlp_ratio": config.get("mlp_ratio"),
        "patch_size": patch,
        "in_channels": in_channels,
        "txt_dim": config.get("txt_dim"),
        "cond_dim": config.get("cond_dim") or hidden,
        "txt_tokens": config.get("txt_tokens"),
        "img_tokens": config.get("img_tokens"),
        "qk_norm": config.get("qk_norm"),
        "dual_attention_layers": list(config.get("dual_attention_layers") or []),
        "use_text_attention_mask": config.get("use_text_attention_mask", True),
    }


def _lora_info(folder: Path) -> dict:
    info: dict[str, Any] = {"rank": None, "alpha": None, "target_modules": []}
    for path in sorted(folder.glob("*.safetensors")):
        try:
            metadata = _safetensors_header(path).get("__metadata__") or {}
            adapter = json.loads(metadata.get("lora_adapter_metadata") or "{}")
        except (OSError, ValueError, struct.error):
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
def template_path() -> Path | None:
    """`$MMDIT_MODEL_CARD_TEMPLATE`, else the repository's `model_cards/template.md`, else None (built-in)."""
    if os.environ.get(TEMPLATE_ENV):
        return Path(os.environ[TEMPLATE_ENV])
    for root in Path(__file__).resolve().parents:
        candidate = root / "model_cards" / "template.md"
        if candidate.is_file():
            return candidate
    return None


def render_body(context: dict, template: str | os.PathLike | None = None) -> str:
    import jinja2

    path = Path(template) if template else template_path()
    source = path.read_text(encoding="utf-8") if path else _FALLBACK_TEMPLATE
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                             undefined=jinja2.ChainableUndefined, autoescape=False)
    env.filters["cell"] = lambda value: str(value).replace("|", "\\|").replace("\n", " ")
    text = env.from_string(source).render(**context)
    text = re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"
    return text


# ---------------------------------------------------------------------------------------------------------------
# Merging with an existing card
# ---------------------------------------------------------------------------------------------------------------
def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def merge_metadata(existing: dict, ours: dict, defaults: dict | None = None) -> dict:
    """`existing` keys are kept; `ours` replace them, except `tags` and `datasets`, which are merged (existing
    first); `defaults` only fill missing keys."""
    merged = dict(existing)
    for key, value in (defaults or {}).items():
        if merged.get(key) in (None, "", []):
            merged[key] = value
    for key, value in ours.items():
        if value is None:
            continue
        if key in ("tags", "datasets"):
            merged[key] = list(dict.fromkeys(_as_list(existing.get(key)) + _as_list(value)))
        else:
            merged[key] = value
    return merged


def _generated_block(text: str) -> str | None:
    start, end = text.find(GENERATED_START), text.find(GENERATED_END)
    if start < 0 or end < start:
        return None
    return text[start : end + len(GENERATED_END)]


def merge_body(existing_text: str | None, rendered: str) -> str:
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


def _is_boilerplate(card_text: str) -> bool:
    return _DIFFUSERS_BOILERPLATE in card_text and "[More Information Needed]" in card_text


def _parse_existing(text: str, repo_id: str):
    """The existing card; a ValueError that says what to fix when its YAML metadata cannot be read (pushing on
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
    template: str | os.PathLike | None = None,
):
    """The `huggingface_hub.ModelCard` for `folder` pushed to `repo_id`.

    Args:
        folder: The saved folder (pipeline, model or LoRA) being pushed.
        existing: The current README.md text (the repo's, or the folder's), or None.
        card_data: Metadata keys (`license`, `base_model`, `datasets`, `tags`, `language`, any other YAML key) and
            the body fields `TEMPLATE_FIELDS`: `model_name`, `description`, `training` (dict), `scores`
            (dict), `limitations`, `prompt` (for the code example).
        samples: `[{"text": prompt, "url": "images/sample_0.png"}, ...]` already in the upload: they become the
            `widget` metadata and a Samples section.
    """
    from huggingface_hub import ModelCard, ModelCardData

    card_data = dict(card_data or {})
    body_fields = {key: card_data.pop(key) for key in TEMPLATE_FIELDS if key in card_data}
    body_fields.pop("sample_images", None)
    samples = list(samples or [])
    info = describe_folder(folder, kind)
    kind = info["kind"]

    if existing is not None and _is_boilerplate(existing):
        existing = None
    old_card = _parse_existing(existing, repo_id) if existing else None
    old_metadata = old_card.data.to_dict() if old_card is not None else {}
    old_text = old_card.text if old_card is not None else None

    tags = BASE_TAGS + (["lora"] if kind == "lora" else []) + _as_list(card_data.pop("tags", None))
    ours = {"library_name": "diffusers", "pipeline_tag": "text-to-image", "tags": tags}
    ours.update({key: value for key, value in card_data.items() if value is not None})
    if "datasets" in ours:
        ours["datasets"] = _as_list(ours["datasets"])
    if samples:
        ours["widget"] = [{"text": s["text"], "output": {"url": s["url"]}} for s in samples]
    defaults = {"license": "other" if ours.get("base_model") else "apache-2.0"}
    metadata = merge_metadata(old_metadata, ours, defaults)

    prompt = body_fields.get("prompt") or (samples[0]["text"] if samples else DEFAULT_PROMPT)
    context = {
        **info,
        "repo_id": repo_id,
        "model_name": body_fields.get("model_name") or repo_id.split("/")[-1],
        "class_name": {"pipeline": "MMDiTPipeline", "model": MODEL_CLASS, "lora": "LoRA"}[kind],
        "base_model": metadata.get("base_model") if isinstance(metadata.get("base_model"), str) else
        (_as_list(metadata.get("base_model")) or [None])[0],
        "datasets": _as_list(metadata.get("datasets")),
        "license": metadata.get("license"),
        "prompt": str(prompt).replace('"', "'"),
        "training": dict(body_fields.get("training") or {}),
        "scores": dict(body_fields.get("scores") or {}),
        "samples": samples,
        "description": body_fields.get("description"),
        "limitations": body_fields.get("limitations"),
    }
    rendered = render_body(context, template)
    body = merge_body(old_text, rendered)
    data = ModelCardData(**metadata)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body.lstrip()}")
