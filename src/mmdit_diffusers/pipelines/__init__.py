from .lora import MMDiTLoraLoaderMixin
from .pipeline_mmdit import MMDiTPipeline, MMDiTPipelineOutput

__all__ = ["MMDiTLoraLoaderMixin", "MMDiTPipeline", "MMDiTPipelineOutput"]
