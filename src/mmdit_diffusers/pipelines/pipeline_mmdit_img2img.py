"""MMDiTImg2ImgPipeline: image-to-image with an `MMDiTTransformer2DModel`.

Sampling starts from the input image's latents, noised to the level of the first step it keeps (`strength` of the
schedule), and runs those steps; everything else (text conditioning, guidance, folders, LoRA) is `MMDiTPipeline`'s.
On SD3 / SD3.5 folders it gives the images of diffusers' `StableDiffusion3Img2ImgPipeline` (same arguments).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.utils import replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor

from ..errors import InputError
from .latents import encode_images
from .pipeline_mmdit import MMDiTPipeline, MMDiTPipelineOutput, NoiseStart, call_arguments

EXAMPLE = """
    Examples:
        ```py
        >>> from PIL import Image
        >>> from mmdit_diffusers import MMDiTImg2ImgPipeline

        >>> pipe = MMDiTImg2ImgPipeline.from_pretrained("pipelines/mmdit-shapes")  # or any SD3 / SD3.5 folder
        >>> picture = Image.open("red-circle-left-of-blue-square.png")
        >>> image = pipe("a red circle left of a green square", image=picture, strength=0.6).images[0]
        ```
"""

# `__call__`'s defaults where the pipeline folder stores none: StableDiffusion3Img2ImgPipeline's.
SD3_IMG2IMG_CALL_DEFAULTS = {"num_inference_steps": 50, "guidance_scale": 7.0, "guidance_rescale": 0.0,
                             "use_cfg_zero_star": False}


class ImageStart(NoiseStart):
    """Sampling starts from `image`: SD3's img2img rule. Of `n` steps, the last `n - int(n - min(n * strength, n))`
    are run, from the image's latents noised to the first of them (`strength=1`: from noise level 1, all steps)."""

    def __init__(self, image, strength):
        self.image, self.strength = image, strength

    def check(self, pipe, output_type) -> None:
        if self.image is None:
            raise InputError("`image` is required: the picture to start from (PIL image, array, tensor, or a list).")
        if isinstance(self.strength, bool) or not isinstance(self.strength, (int, float)) or not 0 <= self.strength <= 1:
            raise InputError(
                f"`strength` must be a number in [0, 1] (how much of the image to redraw); got {self.strength!r}."
            )

    def timesteps(self, pipe, timesteps, num_inference_steps):
        kept = min(num_inference_steps * self.strength, num_inference_steps)
        first = int(max(num_inference_steps - kept, 0)) * pipe.scheduler.order
        if first >= len(timesteps):
            raise InputError(
                f"`strength`={self.strength} keeps none of the {num_inference_steps} steps: raise `strength` or "
                "`num_inference_steps`."
            )
        pipe.scheduler.set_begin_index(first)
        return timesteps[first:], num_inference_steps - first // pipe.scheduler.order

    def latents(self, pipe, batch_size, height, width, dtype, device, generator, latents, timesteps):
        if latents is not None:  # as SD3: given latents are the start, at the first kept step
            return latents.to(device=device, dtype=dtype)
        image = pipe.image_processor.preprocess(self.image, height=height, width=width)
        start = self.to_latents(pipe, image, batch_size, dtype, device, generator)
        noise = randn_tensor(start.shape, generator=generator, device=device, dtype=dtype)
        return pipe.scheduler.scale_noise(start, timesteps[:1].repeat(batch_size), noise)

    @staticmethod
    def to_latents(pipe, image, batch_size, dtype, device, generator, name="image") -> torch.Tensor:
        """Preprocessed images [n, 3, H, W] (or normalised latents [n, C, h, w]) -> latents, the n images repeated
        in turn to fill the batch (image 0, 1, ..., 0, 1, ...), as SD3."""
        image = image.to(device=device)
        if image.shape[1] == pipe.vae.config.latent_channels:
            latents = image
        else:
            latents = encode_images(image, pipe.vae, generator)
        if batch_size % latents.shape[0]:
            raise InputError(
                f"`{name}` holds {latents.shape[0]} images, which do not divide the batch of {batch_size} "
                "(prompts x num_images_per_prompt)."
            )
        return latents.repeat(batch_size // latents.shape[0], 1, 1, 1).to(dtype=dtype)


class MMDiTImg2ImgPipeline(MMDiTPipeline):
    r"""
    Image-to-image with the MMDiT: `MMDiTPipeline` (same components, folders, LoRA, text conditioning, guidance)
    started from an image instead of noise. Arguments as diffusers' `StableDiffusion3Img2ImgPipeline`, plus the
    text masks, skip-layer guidance and guidance options (`guidance_rescale`, `use_cfg_zero_star`) of `MMDiTPipeline`.

    Load it from any folder `MMDiTPipeline` loads (`from_pretrained`), or from a loaded pipeline without copying
    weights (`MMDiTImg2ImgPipeline.from_pipe(pipe)`); a folder's `sampler_defaults` apply here too.
    """

    _sd3_call_defaults = SD3_IMG2IMG_CALL_DEFAULTS

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        image: PipelineImageInput = None,
        strength: float = 0.6,
        num_inference_steps: int | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        negative_prompt_3: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (SD3's signature)
        max_sequence_length: int | None = None,
        skip_guidance_layers: list[int] | None = None,
        skip_layer_guidance_scale: float = 2.8,
        skip_layer_guidance_stop: float = 0.2,
        skip_layer_guidance_start: float = 0.01,
        mu: float | None = None,
        guidance_rescale: float | None = None,
        use_cfg_zero_star: bool | None = None,
    ) -> MMDiTPipelineOutput | tuple:
        r"""
        Redraw an image following the prompt. The arguments `MMDiTPipeline.__call__` has mean the same here; new:

        Args:
            image: The picture to start from: a PIL image, a numpy array [H, W, 3] or [B, H, W, 3] in [0, 1], a
                tensor [B, 3, H, W] in [0, 1] or [-1, 1], a list of them, or normalised latents [B, C, h, w]. It is
                resized to `height` x `width` (default: the transformer's `sample_size * vae_scale_factor`).
            strength: How much to redraw, in [0, 1]: the fraction of the `num_inference_steps` steps that run (the
                image is noised to the level of the first); 1 ignores the image's content.
            num_inference_steps: Steps of the full schedule. Default: the folder's `sampler_defaults`, else SD3
                img2img's 50.
            latents: The noised starting latents at the first step that runs, instead of noising `image`'s.

        Examples:
        """
        return self._generate(ImageStart(image, strength), **call_arguments(locals(), "image", "strength"))
