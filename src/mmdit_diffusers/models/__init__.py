"""The MMDiT transformer (`MMDiTTransformer2DModel`) and its named sizes. Imports only torch, diffusers and
`mmdit_diffusers.conversion`."""

from .clean_image_cache import CleanImageCacheConfig, apply_clean_image_cache
from .presets import PRESETS, paper_preset
from .transformer_mmdit import MMDiTTransformer2DModel

__all__ = ["MMDiTTransformer2DModel", "PRESETS", "paper_preset", "CleanImageCacheConfig", "apply_clean_image_cache"]
