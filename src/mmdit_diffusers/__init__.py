"""mmdit-diffusers: the MMDiT (SD3 / FLUX.1) as a Hugging Face diffusers model and pipeline.

Everything public is exported here; saved checkpoints name these classes as `mmdit_diffusers.<Class>`,
so internal modules can move without breaking them.
"""

from .models import PRESETS, MMDiTTransformer2DModel, paper_preset

__version__ = "0.1.0"

__all__ = ["MMDiTTransformer2DModel", "PRESETS", "paper_preset"]
