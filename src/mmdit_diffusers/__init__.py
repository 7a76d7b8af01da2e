"""mmdit-diffusers: the MMDiT (SD3 / FLUX.1) as a Hugging Face diffusers model and pipeline.

Everything public is exported here; saved checkpoints name these classes as `mmdit_diffusers.<Class>`
(`model_index.json`: ["mmdit_diffusers", "MMDiTTransformer2DModel"]), so internal modules can move
without breaking them.

The names are resolved on first use (PEP 562), as diffusers does, so that `mmdit-diffusers --help` and the
command line's argument errors answer without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "MMDiTTransformer2DModel": "mmdit_diffusers.models",
    "PRESETS": "mmdit_diffusers.models",
    "paper_preset": "mmdit_diffusers.models",
    "MMDiTPipeline": "mmdit_diffusers.pipelines",
    "MMDiTPipelineOutput": "mmdit_diffusers.pipelines",
    "InputError": "mmdit_diffusers.errors",
    # diffusers' pipeline loader looks up, in the library that model_index.json names, both the component's class
    # and its loadable base class by name ("ModelMixin"); re-exporting it makes "mmdit_diffusers" itself the
    # stable library name.
    "ModelMixin": "diffusers",
}

__all__ = [name for name in _EXPORTS if name != "ModelMixin"]

if TYPE_CHECKING:
    from diffusers import ModelMixin  # noqa: F401

    from .errors import InputError  # noqa: F401
    from .models import PRESETS, MMDiTTransformer2DModel, paper_preset  # noqa: F401
    from .pipelines import MMDiTPipeline, MMDiTPipelineOutput  # noqa: F401


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mmdit_diffusers' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
