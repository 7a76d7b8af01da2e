"""mmdit-diffusers: the MMDiT (SD3 / FLUX.1) as a Hugging Face diffusers model and pipeline.

Everything public is exported here; saved checkpoints name these classes as `mmdit_diffusers.<Class>`
(`model_index.json`: ["mmdit_diffusers", "MMDiTTransformer2DModel"]), so internal modules can move
without breaking them.
"""

# diffusers' pipeline loader looks up, in the library that model_index.json names, both the component's
# class and its loadable base class by name ("ModelMixin"); re-exporting it makes "mmdit_diffusers"
# itself the stable library name.
from diffusers import ModelMixin  # noqa: F401

from .models import PRESETS, MMDiTTransformer2DModel, paper_preset
from .pipelines import MMDiTPipeline, MMDiTPipelineOutput

__version__ = "0.1.0"

__all__ = ["MMDiTPipeline", "MMDiTPipelineOutput", "MMDiTTransformer2DModel", "PRESETS", "paper_preset"]
