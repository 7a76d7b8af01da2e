"""mmdit-diffusers: the MMDiT (SD3 / FLUX.1) as a Hugging Face diffusers model and pipeline.

Everything public is exported here; saved checkpoints name these classes as `mmdit_diffusers.<Class>`
(`model_index.json`: ["mmdit_diffusers", "MMDiTTransformer2DModel"]), so internal modules can move
without breaking them.

The names are resolved on first use (PEP 562), as diffusers does, so that `mmdit-diffusers --help` and the
command line's argument errors answer without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_exports

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "MMDiTTransformer2DModel": ".models",
    "PRESETS": ".models",
    "paper_preset": ".models",
    "CleanImageCacheConfig": ".models",
    "apply_clean_image_cache": ".models",
    "MMDiTPipeline": ".pipelines",
    "MMDiTFluxPipeline": ".pipelines",
    "MMDiTPipelineOutput": ".pipelines",
    "MMDiTImg2ImgPipeline": ".pipelines",
    "MMDiTInpaintPipeline": ".pipelines",
    "MMDiTControlNetPipeline": ".pipelines",
    "InputError": ".errors",
    # diffusers' pipeline loader looks up, in the library that model_index.json names, both the component's class
    # and its loadable base class by name ("ModelMixin"); re-exporting it makes "mmdit_diffusers" itself the
    # stable library name.
    "ModelMixin": "diffusers",
}

__all__ = [name for name in _EXPORTS if name != "ModelMixin"]

if TYPE_CHECKING:
    from diffusers import ModelMixin  # noqa: F401

    from .errors import InputError  # noqa: F401
    from .models import (  # noqa: F401
        PRESETS,
        CleanImageCacheConfig,
        MMDiTTransformer2DModel,
        apply_clean_image_cache,
        paper_preset,
    )
    from .pipelines import (  # noqa: F401
        MMDiTFluxPipeline,
        MMDiTControlNetPipeline,
        MMDiTImg2ImgPipeline,
        MMDiTInpaintPipeline,
        MMDiTPipeline,
        MMDiTPipelineOutput,
    )

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
