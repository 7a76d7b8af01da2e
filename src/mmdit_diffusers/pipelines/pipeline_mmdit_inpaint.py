"""MMDiTInpaintPipeline: inpainting with an `MMDiTTransformer2DModel`.

Img2img (`pipeline_mmdit_img2img`) inside a mask: after every step the region outside the mask is put back, as
the input image's latents noised to the next step's level, so only the masked region is redrawn. A transformer
trained for inpainting (input channels = 2 x latent channels + 1) instead reads the mask and the masked image's
latents as extra input channels, as SD3's. On SD3 / SD3.5 folders it gives the images of diffusers'
`StableDiffusion3InpaintPipeline` (same arguments; see `MaskedImageStart.images` for the one difference).
"""

from __future__ import annotations

from typing import Any, Callable

import PIL.Image
import torch
import torch.nn.functional as F
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput, VaeImageProcessor
from diffusers.utils import replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor

from ..errors import InputError
from .pipeline_mmdit import MMDiTPipeline, MMDiTPipelineOutput, call_arguments
from .pipeline_mmdit_img2img import SD3_IMG2IMG_CALL_DEFAULTS, ImageStart

EXAMPLE = """
    Examples:
        ```py
        >>> from PIL import Image
        >>> from mmdit_diffusers import MMDiTInpaintPipeline

        >>> pipe = MMDiTInpaintPipeline.from_pretrained("pipelines/mmdit-shapes")  # or any SD3 / SD3.5 folder
        >>> picture = Image.open("red-circle-left-of-blue-square.png")
        >>> mask = Image.open("square-mask.png")  # white: redraw, black: keep
        >>> image = pipe("a red circle left of a green square", image=picture, mask_image=mask, strength=1.0).images[0]
        ```
"""


class MaskedImageStart(ImageStart):
    """Sampling starts from `image` (as img2img, or from noise at `strength=1`) and redraws where `mask_image` is
    white (>= 0.5 after binarisation)."""

    def __init__(self, image, mask_image, masked_image_latents, strength, padding_mask_crop):
        super().__init__(image, strength)
        self.mask_image, self.masked_image_latents = mask_image, masked_image_latents
        self.padding_mask_crop = padding_mask_crop

    def check(self, pipe, output_type) -> None:
        super().check(pipe, output_type)
        if self.mask_image is None:
            raise InputError("`mask_image` is required: white (1) where to redraw, black (0) where to keep the image.")
        crop = self.padding_mask_crop
        if crop is not None:
            if isinstance(crop, bool) or not isinstance(crop, int) or crop < 0:
                raise InputError(f"`padding_mask_crop` must be a non-negative number of pixels; got {crop!r}.")
            if output_type != "pil" or not all(isinstance(x, PIL.Image.Image) for x in (self.image, self.mask_image)):
                raise InputError(
                    "`padding_mask_crop` pastes the redrawn crop back into `image`: it needs `image` and `mask_image` "
                    f"as PIL images and output_type='pil' (got {type(self.image).__name__}, "
                    f"{type(self.mask_image).__name__}, {output_type!r})."
                )
        latent_channels, in_channels = pipe.vae.config.latent_channels, pipe.transformer.in_channels
        if in_channels not in (latent_channels, 2 * latent_channels + 1):
            raise InputError(
                f"The transformer takes {in_channels} input channels; inpainting needs {latent_channels} (the VAE's "
                f"latent channels) or {2 * latent_channels + 1} (latents, mask and masked-image latents)."
            )

    def latents(self, pipe, batch_size, height, width, dtype, device, generator, latents, timesteps):
        """The starting latents; also keeps, for the steps, the mask and the image's latents (plain transformers)
        or the masked image's latents (inpainting transformers). Generator draws in SD3's order."""
        crops_coords = None
        if self.padding_mask_crop is not None:
            crops_coords = pipe.mask_processor.get_crop_region(self.mask_image, width, height, pad=self.padding_mask_crop)
        self.crops_coords, resize = crops_coords, ("fill" if crops_coords else "default")
        image = pipe.image_processor.preprocess(
            self.image, height=height, width=width, crops_coords=crops_coords, resize_mode=resize
        ).to(dtype=torch.float32)

        latent_size = (height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
        self.conditioned = pipe.transformer.in_channels != pipe.vae.config.latent_channels
        self.image_latents = None
        if not self.conditioned or (latents is None and self.strength < 1):
            self.image_latents = self.to_latents(pipe, image, batch_size, dtype, device, generator)
        if latents is None:
            shape = (batch_size, pipe.vae.config.latent_channels, *latent_size)
            self.noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
            if self.strength == 1:
                latents = self.noise
            else:
                latents = pipe.scheduler.scale_noise(self.image_latents, timesteps[:1].repeat(batch_size), self.noise)
        else:
            self.noise = latents = latents.to(device=device, dtype=dtype)

        mask = pipe.mask_processor.preprocess(
            self.mask_image, height=height, width=width, resize_mode=resize, crops_coords=crops_coords
        )
        self.mask = _fill_batch(F.interpolate(mask, size=latent_size).to(device=device, dtype=dtype), batch_size)
        if self.conditioned:
            masked = self.masked_image_latents
            if masked is None:
                masked = image * (mask < 0.5)
            self.masked_latents = self.to_latents(
                pipe, masked, batch_size, dtype, device, generator, "masked_image_latents"
            )
        return latents

    def model_input(self, model_input):
        if not self.conditioned:
            return model_input
        repeats = model_input.shape[0] // self.mask.shape[0]  # 2 with guidance: [negative; positive]
        extra = (t.repeat(repeats, 1, 1, 1) for t in (self.mask, self.masked_latents))
        return torch.cat([model_input, *extra], dim=1)

    def after_step(self, pipe, step, timesteps, latents):
        """Plain transformers: keep the image outside the mask, noised to the level of the next step (clean after the
        last)."""
        if self.conditioned:
            return latents
        known = self.image_latents
        if step < len(timesteps) - 1:
            known = pipe.scheduler.scale_noise(known, torch.tensor([timesteps[step + 1]]), self.noise)
        return (1 - self.mask) * known + self.mask * latents

    def images(self, pipe, latents, output_type):
        """Decoded as every MMDiT (and SD3 text-to-image / img2img) pipeline: `z / scaling_factor + shift_factor`.
        (diffusers' `StableDiffusion3InpaintPipeline` leaves out `+ shift_factor`, so with a VAE whose shift_factor is
        not 0 its images differ from ours while the latents agree.) With `padding_mask_crop` the redrawn crop is
        pasted back into `image`."""
        images = pipe.decode_latents(latents, output_type)
        if self.crops_coords is not None:
            images = [pipe.image_processor.apply_overlay(self.mask_image, self.image, i, self.crops_coords) for i in images]
        return images


class MMDiTInpaintPipeline(MMDiTPipeline):
    r"""
    Inpainting with the MMDiT: `MMDiTPipeline` (same components, folders, LoRA, text conditioning, guidance) that
    redraws only where a mask says. Arguments as diffusers' `StableDiffusion3InpaintPipeline`, plus the text masks,
    skip-layer guidance and guidance options (`guidance_rescale`, `use_cfg_zero_star`) of `MMDiTPipeline`.

    Load it from any folder `MMDiTPipeline` loads (`from_pretrained`), or from a loaded pipeline without copying
    weights (`MMDiTInpaintPipeline.from_pipe(pipe)`); a folder's `sampler_defaults` apply here too.
    """

    _sd3_call_defaults = SD3_IMG2IMG_CALL_DEFAULTS  # StableDiffusion3InpaintPipeline's are img2img's

    @property
    def mask_processor(self) -> VaeImageProcessor:
        """Masks -> [B, 1, H, W] in {0, 1}: grayscale, binarised at 0.5, not normalised (SD3's)."""
        return VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor,
            vae_latent_channels=self.vae.config.latent_channels,
            do_normalize=False,
            do_binarize=True,
            do_convert_grayscale=True,
        )

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        image: PipelineImageInput = None,
        mask_image: PipelineImageInput = None,
        masked_image_latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = None,
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
        Redraw the masked region of an image following the prompt. The arguments `MMDiTImg2ImgPipeline.__call__`
        has mean the same here; new:

        Args:
            mask_image: Where to redraw: white (>= 0.5) redraw, black keep; a PIL image, array or tensor [B, 1, H, W]
                in [0, 1], or a list. Resized like `image`.
            masked_image_latents: For transformers trained for inpainting: the masked image's normalised latents
                [B, C, h, w] (default: encoded from `image` blanked where the mask is white).
            padding_mask_crop: Redraw only a crop around the mask, this many pixels wider on each side, resized to
                `height` x `width`, then pasted back into `image` (PIL input and output only).
            strength: As img2img; 1 starts from pure noise inside the mask.
            latents: The starting latents (at `strength=1`, the noise) instead of drawing them.

        Examples:
        """
        arguments = call_arguments(locals(), "image", "mask_image", "masked_image_latents", "strength", "padding_mask_crop")
        start = MaskedImageStart(image, mask_image, masked_image_latents, strength, padding_mask_crop)
        return self._generate(start, **arguments)


def _fill_batch(mask: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The masks [n, 1, h, w] repeated in turn to `batch_size` rows, as SD3 repeats them."""
    if batch_size % mask.shape[0]:
        raise InputError(
            f"`mask_image` holds {mask.shape[0]} masks, which do not divide the batch of {batch_size} "
            "(prompts x num_images_per_prompt)."
        )
    return mask.repeat(batch_size // mask.shape[0], 1, 1, 1)
