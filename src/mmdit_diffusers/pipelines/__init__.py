"""Inference: `MMDiTPipeline` (text-to-image), `MMDiTImg2ImgPipeline`, `MMDiTInpaintPipeline`, `MMDiTFluxPipeline`
(FLUX.1 folders), and the pieces they are made of (text encoding, latent space, loading, LoRA).

Names are resolved on first use (PEP 562), so that `pipelines.latents` or `pipelines.text_encoding` can be used
(by training, by recipes) without importing the pipeline, its text-encoder classes and its LoRA loader.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

_EXPORTS = {
    "MMDiTLoraLoaderMixin": ".lora",
    "MMDiTPipeline": ".pipeline_mmdit",
    "MMDiTFluxPipeline": ".pipeline_mmdit_flux",
    "MMDiTPipelineOutput": ".pipeline_mmdit",
    "MMDiTImg2ImgPipeline": ".pipeline_mmdit_img2img",
    "MMDiTInpaintPipeline": ".pipeline_mmdit_inpaint",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from .lora import MMDiTLoraLoaderMixin  # noqa: F401
    from .pipeline_mmdit import MMDiTPipeline, MMDiTPipelineOutput  # noqa: F401
    from .pipeline_mmdit_flux import MMDiTFluxPipeline  # noqa: F401
    from .pipeline_mmdit_img2img import MMDiTImg2ImgPipeline  # noqa: F401
    from .pipeline_mmdit_inpaint import MMDiTInpaintPipeline  # noqa: F401

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
