"""Lets diffusers' generic loader build this folder's pipeline:

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("<this folder or Hub repo>", custom_pipeline="pipeline", trust_remote_code=True)

`MMDiTPipeline` comes from the installed `mmdit-diffusers` package (`pip install mmdit-diffusers`); this file only
re-exports it. Without this file: `from mmdit_diffusers import MMDiTPipeline; MMDiTPipeline.from_pretrained(...)`.
"""

from mmdit_diffusers import MMDiTPipeline

__all__ = ["MMDiTPipeline"]
