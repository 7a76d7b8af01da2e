"""Inference: `MMDiTPipeline` and the pieces it is made of (text encoding, latent space, loading, LoRA).

Names are resolved on first use (PEP 562), so that `pipelines.latents` or `pipelines.text_encoding` can be used
(by training, by recipes) without importing the pipeline, its text-encoder classes and its LoRA loader.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "MMDiTLoraLoaderMixin": "lora",
    "MMDiTPipeline": "pipeline_mmdit",
    "MMDiTPipelineOutput": "pipeline_mmdit",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from .lora import MMDiTLoraLoaderMixin  # noqa: F401
    from .pipeline_mmdit import MMDiTPipeline, MMDiTPipelineOutput  # noqa: F401


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mmdit_diffusers.pipelines' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
