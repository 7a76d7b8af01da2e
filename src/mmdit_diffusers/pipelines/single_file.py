"""`MMDiTPipeline.from_single_file`: a whole pipeline from Stability AI's original SD3 / SD3.5 single file.

The transformer comes from `MMDiTTransformer2DModel.from_single_file` (`model.diffusion_model.*`); everything else
from diffusers' own single-file loader (`FromSingleFileMixin`), as for `StableDiffusion3Pipeline`: the VAE from
`first_stage_model.*`, the text encoders from `text_encoders.clip_l.*`, `clip_g.*`, `t5xxl.*` (or from the config
folder when the file has none), tokenizers and scheduler from the config folder.
"""

from __future__ import annotations

import os

from diffusers.loaders.single_file import FromSingleFileMixin
from diffusers.loaders.single_file_utils import infer_diffusers_model_type

from ..errors import InputError
from ..models.loading_checks import HUB_OPTIONS
from ..models.single_file import read_checkpoint
from ..models.transformer_mmdit import MMDiTTransformer2DModel

SD3_MODEL_TYPES = ("sd3", "sd35_medium", "sd35_large")  # diffusers' names for the checkpoints it has configs for


class MMDiTSingleFilePipelineMixin(FromSingleFileMixin):
    """`from_single_file(path_or_link, config=..., ...)` for `MMDiTPipeline`."""

    @classmethod
    def from_single_file(cls, pretrained_model_link_or_path, **kwargs):
        r"""
        Load a pipeline from an original-layout SD3 / SD3.5 file, as `StableDiffusion3Pipeline.from_single_file`
        does, with our transformer.

        Parameters:
            pretrained_model_link_or_path (`str`): A `.safetensors` file or a Hub link to one.
            config (`str`, *optional*): A diffusers-format SD3 / SD3.5 pipeline folder or Hub repo (or one of ours)
                with the component configs, tokenizers and scheduler (and the weights of any component the file
                lacks). Without it diffusers' default repo for the checkpoint is used, which it knows only for the
                released SD3 Medium, SD3.5 Medium and SD3.5 Large sizes. The transformer's config comes from its
                `transformer/config.json`, else from the tensors (`MMDiTTransformer2DModel.from_single_file`).
            dtype (`torch.dtype`, *optional*): The dtype of every model (`torch_dtype` is accepted too).
            kwargs: Components to use instead of loading them (`transformer=`, `text_encoder_3=None`, ...), and
                diffusers' single-file options (`disable_mmap`, `local_files_only`, `token`, `revision`, ...).
        """
        if kwargs.get("transformer") is None and "transformer" in kwargs:
            raise InputError("`transformer=None`: the pipeline cannot run without a transformer.")
        if "transformer" not in kwargs or kwargs.get("config") is None:
            hub = {name: kwargs[name] for name in HUB_OPTIONS if name in kwargs}
            checkpoint = read_checkpoint(pretrained_model_link_or_path, hub, kwargs.get("disable_mmap", False),
                                         "pretrained_model_link_or_path")
            if kwargs.get("config") is None and infer_diffusers_model_type(checkpoint) not in SD3_MODEL_TYPES:
                raise InputError(
                    "Pass `config=`, a diffusers-format SD3 / SD3.5 pipeline folder or repo id: "
                    f"{pretrained_model_link_or_path!r} is not one of the released SD3 / SD3.5 sizes, whose configs "
                    "diffusers knows."
                )
            if "transformer" not in kwargs:
                options = _transformer_options(kwargs)
                kwargs["transformer"] = MMDiTTransformer2DModel.from_single_file(checkpoint, **options)
        return super().from_single_file(pretrained_model_link_or_path, **kwargs)


def _transformer_options(kwargs: dict) -> dict:
    """The pipeline's loading options that the transformer shares, and its config when `config` has one."""
    options = {name: kwargs[name] for name in (*HUB_OPTIONS, "dtype", "torch_dtype") if name in kwargs}
    config = kwargs.get("config")
    local = config is not None and os.path.isdir(config)
    if config is not None and (not local or os.path.isfile(os.path.join(config, "transformer", "config.json"))):
        options.update(config=config, subfolder="transformer")
    return options
