"""Inference: `MMDiTPipeline` (text-to-image), `MMDiTImg2ImgPipeline`, `MMDiTInpaintPipeline`,
`MMDiTControlNetPipeline`, `MMDiTFluxPipeline` (FLUX.1 folders), and the pieces they are made of (text encoding,
latent space, loading, LoRA, IP-Adapter).

Names are resolved on first use (PEP 562), so that `pipelines.latents` or `pipelines.text_encoding` can be used
(by training, by recipes) without importing the pipeline, its text-encoder classes and its LoRA loader.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

_EXPORTS = {
    "MMDiTLoraLoaderMixin": ".lora",
    "MMDiTIPAdapterMixin": ".ip_adapter",
    "MMDiTPipeline": ".pipeline_mmdit",
    "MMDiTFluxPipeline": ".pipeline_mmdit_flux",
    "MMDiTPipelineOutput": ".pipeline_mmdit",
    "MMDiTImg2ImgPipeline": ".pipeline_mmdit_img2img",
    "MMDiTInpaintPipeline": ".pipeline_mmdit_inpaint",
    "MMDiTControlNetPipeline": ".pipeline_mmdit_controlnet",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from .ip_adapter import MMDiTIPAdapterMixin  # noqa: F401
    from .lora import MMDiTLoraLoaderMixin  # noqa: F401
    from .pipeline_mmdit import MMDiTPipeline, MMDiTPipelineOutput  # noqa: F401
    from .pipeline_mmdit_flux import MMDiTFluxPipeline  # noqa: F401
    from .pipeline_mmdit_controlnet import MMDiTControlNetPipeline  # noqa: F401
    from .pipeline_mmdit_img2img import MMDiTImg2ImgPipeline  # noqa: F401
    from .pipeline_mmdit_inpaint import MMDiTInpaintPipeline  # noqa: F401

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
