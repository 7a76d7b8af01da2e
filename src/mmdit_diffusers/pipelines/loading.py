"""Saving and loading helpers of `MMDiTPipeline`: the `pipeline.py` shim, package-root class names in
`model_index.json`, diffusers' registry of loadable libraries (for Hub repos), and diffusers-format SD3 / SD3.5 and
FLUX.1 folders."""

from __future__ import annotations

import importlib
import os

from diffusers import DiffusionPipeline, SD3Transformer2DModel
from diffusers.pipelines.pipeline_loading_utils import ALL_IMPORTABLE_CLASSES
from diffusers.utils import logging

from ..errors import InputError
from ..files import config_class_name, is_missing_local_path, safetensors_problem
from ..models.loading_checks import HUB_OPTIONS
from ..models.loading_checks import SD3_CLASS as SD3_TRANSFORMER_CLASS  # noqa: F401 (`loading.SD3_TRANSFORMER_CLASS`)

logger = logging.get_logger(__name__)

PACKAGE = "mmdit_diffusers"
SHIM_FILE = "pipeline.py"
SHIM_MODULE = "pipeline"  # `custom_pipeline="pipeline"`: diffusers looks for `<folder>/pipeline.py`
FLUX_TRANSFORMER_CLASS = "FluxTransformer2DModel"
FLUX_PIPELINE_CLASSES = ("FluxPipeline", "MMDiTFluxPipeline")  # diffusers' and ours (`_class_name`)
# pipelines whose folders have MMDiTPipeline's components (a missing one is a broken folder, not another kind)
SD3_LAYOUT_PIPELINES = ("MMDiTPipeline", "StableDiffusion3Pipeline")
UNUSED_FLUX_COMPONENTS = ("image_encoder", "feature_extractor")  # FLUX.1 folders' IP-Adapter parts

SHIM_SOURCE = '''"""Lets diffusers' generic loader build this folder's pipeline:

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("<this folder or Hub repo>", custom_pipeline="pipeline", trust_remote_code=True)

`MMDiTPipeline` comes from the installed `mmdit-diffusers` package (`pip install mmdit-diffusers`); this file only
re-exports it. Without this file: `from mmdit_diffusers import MMDiTPipeline; MMDiTPipeline.from_pretrained(...)`.
"""

from mmdit_diffusers import {class_name}

__all__ = ["{class_name}"]
'''


def register_with_diffusers() -> None:
    """Let diffusers download pipelines whose model_index.json names our package root (`["mmdit_diffusers",
    "MMDiTTransformer2DModel"]`) from the Hub.

    `DiffusionPipeline.download` accepts a component library only when it is in diffusers' `LOADABLE_CLASSES`
    (or is a diffusers pipeline module, or ships `<component>/<library>.py` as remote code); otherwise it raises
    "transformer/mmdit_diffusers.py ... does not exist". Local folders skip that check, so only Hub repos need it:
    `MMDiTPipeline.from_pretrained` calls this before loading one (importing registers nothing). Idempotent.
    """
    from diffusers.pipelines import pipeline_loading_utils

    pipeline_loading_utils.LOADABLE_CLASSES.setdefault(PACKAGE, {"ModelMixin": ["save_pretrained", "from_pretrained"]})


def write_shim(save_directory: str | os.PathLike, class_name: str) -> None:
    os.makedirs(save_directory, exist_ok=True)
    with open(os.path.join(save_directory, SHIM_FILE), "w", encoding="utf-8") as f:
        f.write(SHIM_SOURCE.format(class_name=class_name))


def package_root_library(library: str | None, class_name: str | None, cls: type) -> str | None:
    """`mmdit_diffusers` for a class of ours that diffusers can load from the package root (the stable import path),
    else `library` (diffusers' default: the defining module).

    diffusers' loader resolves `["mmdit_diffusers", "MMDiTTransformer2DModel"]` by reading the class *and* its
    loadable base (`ModelMixin`, ...) from the named module, so the root must export both.
    """
    if not library or not library.startswith(PACKAGE + "."):
        return library
    root = importlib.import_module(PACKAGE)
    if getattr(root, class_name or "", None) is not cls:
        return library
    bases = (getattr(root, name, None) for name in ALL_IMPORTABLE_CLASSES)
    if not any(isinstance(base, type) and issubclass(cls, base) for base in bases):
        return library
    return PACKAGE


def transformer_class_name(pretrained_model_name_or_path, kwargs: dict) -> str | None:
    """`_class_name` of the folder's `transformer/config.json` (None when there is none)."""
    hub_kwargs = {k: kwargs[k] for k in HUB_OPTIONS if k in kwargs}
    try:
        config = SD3Transformer2DModel.load_config(pretrained_model_name_or_path, subfolder="transformer", **hub_kwargs)
    except (OSError, ValueError):
        return None  # no transformer config: let diffusers' loader report what is missing
    return config.get("_class_name")


def pipeline_config(pretrained_model_name_or_path, kwargs: dict) -> dict | None:
    """The folder's `model_index.json` (None when there is none)."""
    hub_kwargs = {k: kwargs[k] for k in HUB_OPTIONS if k in kwargs}
    try:
        return DiffusionPipeline.load_config(pretrained_model_name_or_path, **hub_kwargs)
    except (OSError, ValueError):
        return None


def is_flux_folder(pretrained_model_name_or_path, kwargs: dict) -> bool:
    """Whether the folder is a FLUX.1 pipeline: saved by diffusers' `FluxPipeline` or our `MMDiTFluxPipeline`, or
    holding a `FluxTransformer2DModel`."""
    config = pipeline_config(pretrained_model_name_or_path, kwargs)
    if config is None:
        return False
    transformer = config.get("transformer")
    transformer_class = transformer[1] if isinstance(transformer, (list, tuple)) and len(transformer) == 2 else None
    return config.get("_class_name") in FLUX_PIPELINE_CLASSES or transformer_class == FLUX_TRANSFORMER_CLASS


def _transformer_options(kwargs: dict) -> dict:
    """The pipeline's loading options (`dtype`, `variant`, Hub options, ...) as the transformer's."""
    options = {k: kwargs[k] for k in (*HUB_OPTIONS, "variant", "use_safetensors", "low_cpu_mem_usage") if k in kwargs}
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))  # diffusers >= 0.42 says `dtype`
    if isinstance(dtype, dict):
        dtype = dtype.get("transformer", dtype.get("default"))
    if dtype is not None:
        options["dtype"] = dtype
    return options


def load_converted_sd3_transformer(pretrained_model_name_or_path, kwargs: dict):
    """Load the folder's `SD3Transformer2DModel` with the pipeline's loading options and convert it."""
    from ..models.transformer_mmdit import MMDiTTransformer2DModel

    logger.info("Converting the SD3 transformer to MMDiTTransformer2DModel.")
    return MMDiTTransformer2DModel.from_sd3(pretrained_model_name_or_path, subfolder="transformer",
                                            **_transformer_options(kwargs))


def load_converted_flux_transformer(pretrained_model_name_or_path, kwargs: dict):
    """Load the folder's `FluxTransformer2DModel` with the pipeline's loading options and convert it."""
    from ..models.transformer_mmdit import MMDiTTransformer2DModel

    logger.info("Converting the FLUX.1 transformer to MMDiTTransformer2DModel.")
    return MMDiTTransformer2DModel.from_flux(pretrained_model_name_or_path, subfolder="transformer",
                                             **_transformer_options(kwargs))


def unused_components(pretrained_model_name_or_path, kwargs: dict) -> list[str]:
    """Components of a FLUX.1 folder that our FLUX pipeline does not use and that are not empty there."""
    config = pipeline_config(pretrained_model_name_or_path, kwargs)
    if config is None:
        return []
    return [name for name in UNUSED_FLUX_COMPONENTS if isinstance(config.get(name), (list, tuple)) and config[name][0]]


def check_local_components(folder, expected: list[str], optional: list[str], passed: dict) -> None:
    """Name the component when a local pipeline folder lacks one (diffusers' own errors name a file or list every
    component), the folder's pipeline class when it is another kind of pipeline, and the file when a component's
    safetensors weights are damaged (from their headers). Hub repos are left to diffusers."""
    if is_missing_local_path(folder):
        raise InputError(f"Cannot load the pipeline from {folder}: no such folder (and not a Hub repo id such as "
                         "'stabilityai/stable-diffusion-3.5-medium').")
    if not os.path.isdir(folder):
        return
    if not os.path.isfile(os.path.join(folder, DiffusionPipeline.config_name)):
        model_class = config_class_name(os.path.join(folder, "config.json"))
        if model_class is not None:
            raise InputError(f"Cannot load {folder} as a pipeline: it is a model folder ({model_class}, config.json; no "
                             f"model_index.json). Load it with {model_class}.from_pretrained, or pass it to the pipeline "
                             "as a component.")
        return
    config = DiffusionPipeline.load_config(folder)
    folder_class = config.get("_class_name")
    missing = [name for name in expected if name not in passed and name not in optional and config.get(name) is None]
    if missing and folder_class not in (*SD3_LAYOUT_PIPELINES, *FLUX_PIPELINE_CLASSES):
        components = sorted(name for name, entry in config.items() if isinstance(entry, (list, tuple)) and entry[0])
        raise InputError(
            f"Cannot load {folder} as an MMDiTPipeline: it is a {folder_class} folder (components: "
            f"{', '.join(components) or 'none'}), not an SD3 / SD3.5 / FLUX.1 / MMDiT pipeline, which has "
            f"{', '.join(name for name in expected if name not in optional)}. Load it with diffusers' "
            f"DiffusionPipeline.from_pretrained."
        )
    for name in expected:
        if name in passed:
            continue
        entry = config.get(name)
        if entry is None and name not in optional:
            raise ValueError(
                f"Cannot load the pipeline from {folder}: its model_index.json has no `{name}` component. Add it to "
                f"the folder or pass `{name}=...` to `from_pretrained`."
            )
        if not (isinstance(entry, (list, tuple)) and entry[0] is not None):
            continue
        component_dir = os.path.join(folder, name)
        if not os.path.isdir(component_dir):
            raise ValueError(
                f"Cannot load the pipeline from {folder}: component `{name}` ({entry[1]}) is listed in model_index.json "
                f"but its folder `{name}/` is missing. Restore it or pass `{name}=...` to `from_pretrained`."
            )
        for file in sorted(f for f in os.listdir(component_dir) if f.endswith(".safetensors")):
            problem = safetensors_problem(os.path.join(component_dir, file))
            if problem:
                raise InputError(f"Cannot load the pipeline from {folder}: component `{name}`'s weights file "
                                 f"{name}/{file} {problem}.")
