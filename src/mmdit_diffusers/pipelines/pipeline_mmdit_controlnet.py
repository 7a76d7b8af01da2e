"""MMDiTControlNetPipeline: `MMDiTPipeline` guided by SD3 ControlNets (diffusers' `SD3ControlNetModel`, or several in
an `SD3MultiControlNetModel`), with the arguments and numbers of diffusers' `StableDiffusion3ControlNetPipeline`.

Why a pipeline of our own: diffusers' ControlNet pipeline runs our transformer (with the same images) only where an
SD3 pipeline would: SD3's text layout (two CLIPs and T5, 77 + 256 tokens), no text mask, no stored sampler settings,
and it cannot give SD3.5's ControlNets that borrow the transformer's patch embedding (`use_pos_embed=False`) ours.
This class is `MMDiTPipeline` (its text conditioning, masks, sampler defaults, skip-layer guidance, IP-Adapter, LoRA)
with three additions: the `controlnet` component, the control image encoded where SD3's pipeline encodes it (just
before the initial noise is drawn), and the ControlNet's residuals passed with every transformer call
(`block_controlnet_hidden_states`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.image_processor import PipelineImageInput
from diffusers.models import AutoencoderKL, SD3ControlNetModel, SD3MultiControlNetModel
from diffusers.models.embeddings import PatchEmbed
from diffusers.schedulers import FlowMatchEulerDiscreteScheduler
from transformers import (
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    SiglipImageProcessor,
    SiglipVisionModel,
    T5EncoderModel,
    T5TokenizerFast,
)

from ..conversion.sd3 import mmdit_state_dict_to_sd3
from ..errors import InputError
from ..models.transformer_mmdit import MMDiTTransformer2DModel
from .pipeline_mmdit import MMDiTPipeline


@dataclass
class ControlInputs:
    """One call's ControlNet inputs: the control latents (one per ControlNet, the whole guidance batch), each
    ControlNet's scale and the fraction of the steps where it acts, the optional pooled projections."""

    images: list[PipelineImageInput]
    scales: list[float]
    starts: list[float]
    ends: list[float]
    pooled_projections: torch.Tensor | None
    latents: list[torch.Tensor] | None = None

    def scales_at(self, step: int, num_steps: int) -> list[float]:
        """Each ControlNet's scale at `step` (SD3's rule: 0 outside `[start, end]` as fractions of the steps)."""
        return [scale * float(not (step / num_steps < start or (step + 1) / num_steps > end))
                for scale, start, end in zip(self.scales, self.starts, self.ends)]


class MMDiTControlNetPipeline(MMDiTPipeline):
    r"""
    Text-to-image with an `MMDiTTransformer2DModel` guided by one or several SD3 ControlNets.

    Args:
        controlnet ([`SD3ControlNetModel`], a list of them or [`SD3MultiControlNetModel`]): Gives the transformer's
            blocks residuals from a control image (edges, depth, ...); a list becomes an `SD3MultiControlNetModel`.
            A ControlNet without its own patch embedding (SD3.5's, `use_pos_embed=False`) gets the transformer's.
        The other components: as [`MMDiTPipeline`].

    `__call__` takes `MMDiTPipeline`'s arguments plus SD3's ControlNet arguments (`control_image`,
    `controlnet_conditioning_scale`, `control_guidance_start`, `control_guidance_end`,
    `controlnet_pooled_projections`).
    """

    model_cpu_offload_seq = (
        "text_encoder->text_encoder_2->text_encoder_3->image_encoder->controlnet->transformer->vae"
    )

    def __init__(
        self,
        transformer: MMDiTTransformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        controlnet: SD3ControlNetModel | list[SD3ControlNetModel] | SD3MultiControlNetModel,
        text_encoder_2: CLIPTextModelWithProjection | None = None,
        tokenizer_2: CLIPTokenizer | None = None,
        text_encoder_3: T5EncoderModel | None = None,
        tokenizer_3: T5TokenizerFast | None = None,
        image_encoder: SiglipVisionModel | None = None,
        feature_extractor: SiglipImageProcessor | None = None,
        sampler_defaults: dict[str, Any] | None = None,
    ):
        super().__init__(transformer, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                         text_encoder_3, tokenizer_3, image_encoder, feature_extractor, sampler_defaults)
        if isinstance(controlnet, (list, tuple)):
            controlnet = SD3MultiControlNetModel(controlnet)
        for net in _nets(controlnet):
            if net.config.get("use_pos_embed", True) is False:
                net.pos_embed = sd3_patch_embedding(transformer).to(net.device, net.dtype)
        self.register_modules(controlnet=controlnet)
        self._control = None

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        control_image: PipelineImageInput | list[PipelineImageInput] = None,
        controlnet_conditioning_scale: float | list[float] = 1.0,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        controlnet_pooled_projections: torch.Tensor | None = None,
        **kwargs,
    ):
        r"""
        Generate images from text under the control of `control_image`; every other argument is
        [`MMDiTPipeline.__call__`]'s.

        Args:
            control_image: The control image (a PIL image, array or tensor in [0, 1]), resized to the output size;
                one per ControlNet with several. One image for the batch, or one per prompt.
            controlnet_conditioning_scale: Weight of each ControlNet's residuals (one number for all, or a list).
            control_guidance_start, control_guidance_end: Fractions of the steps between which each ControlNet acts
                (SD3's rule: step `i` of `n` counts when `start <= i / n` and `(i + 1) / n <= end`).
            controlnet_pooled_projections: Pooled projections for the ControlNet instead of the prompt's (zeros for
                ControlNets with `force_zeros_for_pooled_projection`, as SD3).
        """
        self._control = self._control_inputs(control_image, controlnet_conditioning_scale, control_guidance_start,
                                             control_guidance_end, controlnet_pooled_projections)
        try:
            return super().__call__(prompt, **kwargs)
        finally:
            self._control = None

    def _control_inputs(self, images, scales, starts, ends, pooled) -> ControlInputs:
        """The ControlNet arguments, one entry per ControlNet, checked."""
        nets = len(_nets(self.controlnet))
        multi = isinstance(self.controlnet, SD3MultiControlNetModel)
        if images is None:
            raise InputError("`control_image` is required: the image the ControlNet follows.")
        images = images if multi else [images]
        if multi and (not isinstance(images, (list, tuple)) or len(images) != nets):
            raise InputError(f"`control_image` must be a list of {nets} images, one per ControlNet; got "
                             f"{type(images).__name__}.")
        per_net = {}
        for name, value in (("controlnet_conditioning_scale", scales), ("control_guidance_start", starts),
                            ("control_guidance_end", ends)):
            values = list(value) if isinstance(value, (list, tuple)) else [value] * nets
            if len(values) != nets or not all(isinstance(v, (int, float)) for v in values):
                raise InputError(f"`{name}` must be a number or a list of {nets} numbers; got {value!r}.")
            per_net[name] = [float(v) for v in values]
        for start, end in zip(per_net["control_guidance_start"], per_net["control_guidance_end"]):
            if not 0.0 <= start < end <= 1.0:
                raise InputError(f"`control_guidance_start` {start} and `control_guidance_end` {end} must satisfy "
                                 "0 <= start < end <= 1.")
        return ControlInputs(list(images), per_net["controlnet_conditioning_scale"],
                             per_net["control_guidance_start"], per_net["control_guidance_end"], pooled)

    def prepare_latents(self, batch_size, num_channels_latents, height, width, dtype, device, generator, latents=None):
        """The initial noise, after encoding the control image(s) (SD3's order: a VAE sample draws from the global
        random state, as SD3's ControlNet pipeline does)."""
        if self._control is not None:
            self._control.latents = [self._control_latents(image, net, batch_size, height, width, dtype, device)
                                     for image, net in zip(self._control.images, _nets(self.controlnet))]
        return super().prepare_latents(batch_size, num_channels_latents, height, width, dtype, device, generator,
                                       latents)

    def _control_latents(self, image, net, batch_size, height, width, dtype, device) -> torch.Tensor:
        """A control image as normalised VAE latents for the whole guidance batch ([negative; positive] halves)."""
        if not isinstance(image, torch.Tensor):
            image = self.image_processor.preprocess(image, height=height, width=width)
        # one image for the batch, or one per prompt (repeated per image of that prompt)
        image = image.repeat_interleave(batch_size // image.shape[0] if image.shape[0] > 1 else batch_size, dim=0)
        if image.shape[0] != batch_size:
            raise InputError(f"`control_image` has {image.shape[0]} images for a batch of {batch_size}; pass one, or "
                             "one per prompt.")
        image = image.to(device=device, dtype=dtype)
        if self.do_classifier_free_guidance:
            image = torch.cat([image] * 2)
        latents = self.vae.encode(image).latent_dist.sample()
        # InstantX's SD3 ControlNets (which zero the pooled projections) were trained without the VAE's shift
        shift = 0.0 if net.config.force_zeros_for_pooled_projection else self.vae.config.shift_factor or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def _velocity(self, cache_context: str, **inputs) -> torch.Tensor:
        """The transformer call with the ControlNets' residuals for the same inputs."""
        if self._control is not None:
            inputs["block_controlnet_hidden_states"] = self._residuals(**inputs)
        return super()._velocity(cache_context, **inputs)

    def _residuals(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, **_) -> tuple:
        """Every ControlNet on this call's inputs, summed per block (`SD3MultiControlNetModel`). A call on part of
        the guidance batch (skip-layer guidance's positive half) gets the matching part of the control latents."""
        control, batch = self._control, hidden_states.shape[0]
        step = self.scheduler.step_index or 0  # the step in progress (None before the scheduler's first step)
        scales = control.scales_at(step, self.num_timesteps)
        config = _nets(self.controlnet)[0].config
        if config.force_zeros_for_pooled_projection:
            pooled = torch.zeros_like(pooled_projections)
        else:
            pooled = pooled_projections if control.pooled_projections is None else control.pooled_projections
        # SD3.5's own ControlNets take no text (`joint_attention_dim=None`)
        text = encoder_hidden_states if config.joint_attention_dim is not None else None
        images = [latents[-batch:] for latents in control.latents]
        multi = isinstance(self.controlnet, SD3MultiControlNetModel)
        return self.controlnet(
            hidden_states=hidden_states,
            timestep=timestep,
            encoder_hidden_states=text,
            pooled_projections=pooled,
            joint_attention_kwargs=self.joint_attention_kwargs,
            controlnet_cond=images if multi else images[0],
            conditioning_scale=scales if multi else scales[0],
            return_dict=False,
        )[0]


def _nets(controlnet) -> list[SD3ControlNetModel]:
    return list(controlnet.nets) if isinstance(controlnet, SD3MultiControlNetModel) else [controlnet]


def sd3_patch_embedding(transformer) -> PatchEmbed:
    """The transformer's patch embedding and sin-cos positions as diffusers' `PatchEmbed` (SD3's `pos_embed`), for
    SD3.5's ControlNets, which use the transformer's (diffusers' `_get_pos_embed_from_transformer` reads SD3's)."""
    config = transformer.resolved_config
    weights = {f"x_embedder.{name}": tensor for name, tensor in transformer.x_embedder.state_dict().items()}
    converted = mmdit_state_dict_to_sd3(weights, config)
    embedding = PatchEmbed(height=config["sample_size"], width=config["sample_size"], patch_size=config["patch_size"],
                           in_channels=config["in_channels"], embed_dim=config["hidden_size"],
                           pos_embed_max_size=config["pos_embed_max_size"])
    embedding.load_state_dict({name.removeprefix("pos_embed."): tensor for name, tensor in converted.items()})
    return embedding
