"""SD3.5's IP-Adapter on `MMDiTPipeline`: loading, the image prompt's encoding, and what `__call__` passes on.

`load_ip_adapter`, `set_ip_adapter_scale` and `is_ip_adapter_active` are diffusers' own (`SD3IPAdapterMixin`): the
same files (`image_proj.*`, `ip_adapter.*`), the same SigLIP image encoder and processor, registered as the
pipeline's optional `image_encoder` and `feature_extractor`. The transformer side is
`mmdit_diffusers.models.ip_adapter`.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.image_processor import PipelineImageInput
from diffusers.loaders import SD3IPAdapterMixin

from ..errors import InputError
from ..models.ip_adapter import IMAGE_EMBEDS_KEY


class MMDiTIPAdapterMixin(SD3IPAdapterMixin):
    """IP-Adapter methods of the MMDiT pipelines (with `image_encoder`, `feature_extractor` and `transformer`)."""

    def unload_ip_adapter(self) -> None:
        """Remove the image encoder, the feature extractor, the image projection and the IP-Adapter processors (the
        joint attentions get our default processor back; diffusers' SD3 version would put its own there)."""
        for name in ("image_encoder", "feature_extractor"):
            if getattr(self, name, None) is not None:
                setattr(self, name, None)
                self.register_to_config(**{name: (None, None)})
        self.transformer._unload_ip_adapter_weights()

    def encode_image(self, image: PipelineImageInput, device: torch.device) -> torch.Tensor:
        """The image encoder's penultimate hidden states [B, patches, width] (SD3's image-prompt features); `image`
        is preprocessed by the feature extractor unless it is already a tensor of pixel values."""
        if self.image_encoder is None:
            raise InputError(
                "`ip_adapter_image` needs an image encoder, and this pipeline has none: load the IP-Adapter with its "
                "image encoder (`load_ip_adapter(..., image_encoder_folder=...)`) or pass `ip_adapter_image_embeds`."
            )
        if not isinstance(image, torch.Tensor):
            image = self.feature_extractor(image, return_tensors="pt").pixel_values
        image = image.to(device=device, dtype=self.image_encoder.dtype)
        return self.image_encoder(image, output_hidden_states=True).hidden_states[-2]

    def prepare_ip_adapter_image_embeds(
        self,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: torch.Tensor | None = None,
        device: torch.device | None = None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
    ) -> torch.Tensor:
        """The image prompt's features for the whole batch, as SD3: one image's features repeated
        `num_images_per_prompt` times (here: every image of the batch), after as many zeros (the unconditional
        half) with guidance. `ip_adapter_image_embeds` is one image's features [1, patches, width], or with guidance
        [2, patches, width] = [negative; positive]."""
        device = device or self._execution_device
        if ip_adapter_image is not None and ip_adapter_image_embeds is not None:
            raise InputError("Pass `ip_adapter_image` or `ip_adapter_image_embeds`, not both.")
        if ip_adapter_image_embeds is not None:
            expected = 2 if do_classifier_free_guidance else 1
            if ip_adapter_image_embeds.ndim != 3 or ip_adapter_image_embeds.shape[0] != expected:
                layout = " = [negative; positive] with guidance" if expected == 2 else ""
                raise InputError(f"`ip_adapter_image_embeds` has shape {tuple(ip_adapter_image_embeds.shape)}; "
                                 f"expected [{expected}, patches, width]{layout}.")
            embeds = ip_adapter_image_embeds.chunk(expected)
        elif ip_adapter_image is not None:
            positive = self.encode_image(ip_adapter_image, device)
            if positive.shape[0] != 1:
                raise InputError(f"`ip_adapter_image` must be one image; got {positive.shape[0]}.")
            embeds = (torch.zeros_like(positive), positive) if do_classifier_free_guidance else (positive,)
        else:
            raise InputError("Pass `ip_adapter_image` or `ip_adapter_image_embeds`.")
        return torch.cat([half.expand(num_images_per_prompt, -1, -1) for half in embeds]).to(device)

    def ip_adapter_attention_kwargs(
        self,
        joint_attention_kwargs: dict[str, Any] | None,
        ip_adapter_image: PipelineImageInput | None,
        ip_adapter_image_embeds: torch.Tensor | None,
        batch_size: int,
        device: torch.device,
    ) -> dict[str, Any] | None:
        """The `joint_attention_kwargs` of the denoising loop: a copy of the caller's with the image prompt's features
        added when there is one (the transformer projects them at every step, as SD3's). As SD3, an image is ignored
        while the adapter's scale is 0; without a loaded adapter it is refused."""
        if (ip_adapter_image is not None or ip_adapter_image_embeds is not None) and not self._has_ip_adapter:
            raise InputError(
                "`ip_adapter_image` / `ip_adapter_image_embeds` need an IP-Adapter: load one first with "
                "`pipe.load_ip_adapter(...)`."
            )
        if not ((ip_adapter_image is not None and self.is_ip_adapter_active) or ip_adapter_image_embeds is not None):
            return joint_attention_kwargs
        embeds = self.prepare_ip_adapter_image_embeds(
            ip_adapter_image, ip_adapter_image_embeds, device, batch_size, self.do_classifier_free_guidance
        )
        return {**(joint_attention_kwargs or {}), IMAGE_EMBEDS_KEY: embeds}

    @property
    def _has_ip_adapter(self) -> bool:
        return getattr(self.transformer, "image_proj", None) is not None
