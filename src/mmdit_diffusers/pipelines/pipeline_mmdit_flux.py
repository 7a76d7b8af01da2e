"""MMDiTFluxPipeline: text-to-image with a FLUX-style `MMDiTTransformer2DModel`, as diffusers' `FluxPipeline`.

On FLUX.1 weights it gives the images of diffusers' `FluxPipeline` (same arguments, same numbers). Where FLUX.1
samples differently from SD3:
- text: T5's hidden states are the text sequence, CLIP's pooled output the pooled vector (`text_encoding.FLUX_TEXT`);
- latents: FLUX packs 2 x 2 latent patches into tokens. Our transformer takes the latents [B, C, H, W] and packs them
  itself (`patchify`, features in FLUX's (c, row, col) order), so the noise is drawn exactly as FluxPipeline draws it
  and the sampler, the callbacks and `output_type="latent"` see [B, C, H, W];
- timesteps: `sigmas = linspace(1, 1/n, n)`, shifted by `mu`, which grows with the image token count (the scheduler's
  `use_dynamic_shifting`; diffusers' `calculate_shift`);
- guidance: FLUX.1 [dev] is guidance-distilled: `guidance_scale` is a transformer input (`guidance`), one model call
  per step. True classifier-free guidance with a negative prompt is `true_cfg_scale > 1` (both halves in one batch).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.autoencoders import AutoencoderKL
from diffusers.schedulers import FlowMatchEulerDiscreteScheduler
from diffusers.utils import logging, replace_example_docstring
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from ..errors import InputError
from ..models.embeddings import unpatchify
from ..models.transformer_mmdit import MMDiTTransformer2DModel
from . import call_checks, loading
from .latents import vae_scale_factor
from .pipeline_mmdit import CLIP_TOKENS, MMDiTPipeline, MMDiTPipelineOutput, NoiseStart
from .text_encoding import FLUX_TEXT, TextConditioning, encode_text

logger = logging.get_logger(__name__)

# `__call__`'s defaults where the pipeline folder stores none: FluxPipeline's.
FLUX_CALL_DEFAULTS = {"num_inference_steps": 28, "guidance_scale": 3.5, "true_cfg_scale": 1.0}
FLUX_T5_TOKENS = 512  # FluxPipeline's default (and largest) `max_sequence_length`

EXAMPLE = """
    Examples:
        ```py
        >>> import torch
        >>> from mmdit_diffusers import MMDiTPipeline

        >>> # a diffusers-format FLUX.1 folder or repo: the transformer is converted on load
        >>> pipe = MMDiTPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", dtype=torch.bfloat16)
        >>> pipe.to("cuda")
        >>> image = pipe("a red circle left of a blue square", num_inference_steps=28, guidance_scale=3.5).images[0]
        ```
"""


class MMDiTFluxPipeline(MMDiTPipeline):
    r"""
    Text-to-image with a FLUX-style MMDiT: FLUX.1's text conditioning, latent packing, resolution-dependent shift and
    distilled guidance. `MMDiTPipeline.from_pretrained` returns this class for FLUX.1 folders.

    Args:
        transformer ([`MMDiTTransformer2DModel`]): Denoises the latents (FLUX-style: `pos_embed_type="rope"`,
            single-stream blocks, `guidance_embeds` for [dev]; any MMDiT whose text width is T5's works).
        scheduler ([`FlowMatchEulerDiscreteScheduler`]): The sampler; FLUX.1's shifts dynamically by `mu`.
        vae ([`AutoencoderKL`]): Latents <-> images, normalised by its `shift_factor` and `scaling_factor`.
        text_encoder ([`CLIPTextModel`]) and tokenizer ([`CLIPTokenizer`]): CLIP, for the pooled vector only.
        text_encoder_2 ([`T5EncoderModel`]) and tokenizer_2 ([`T5TokenizerFast`]): T5, the text sequence.

    Transformers with `use_text_attention_mask` also get T5's token mask; FLUX.1 weights attend to the padding, as
    they were trained. Saving writes our own folder layout (`model_index.json` names this class), which
    `MMDiTPipeline.from_pretrained` and `MMDiTFluxPipeline.from_pretrained` load back; the folder's
    `sampler_defaults` may hold `num_inference_steps`, `guidance_scale` and `true_cfg_scale`.
    """

    text_layout = FLUX_TEXT
    model_cpu_offload_seq = "text_encoder->text_encoder_2->transformer->vae"
    _optional_components = []
    _callback_tensor_inputs = ["latents", "prompt_embeds"]
    _sd3_call_defaults = FLUX_CALL_DEFAULTS  # the diffusers pipeline whose defaults this class follows: FluxPipeline

    def __init__(
        self,
        transformer: MMDiTTransformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        text_encoder_2: T5EncoderModel,
        tokenizer_2: T5TokenizerFast,
        sampler_defaults: dict[str, Any] | None = None,
    ):
        super(MMDiTPipeline, self).__init__()  # DiffusionPipeline's: the components differ from MMDiTPipeline's
        self.register_modules(
            transformer=transformer,
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
        )
        self.register_sampler_defaults(**(sampler_defaults or {}))
        self.vae_scale_factor = vae_scale_factor(vae)
        self.patch_size = transformer.config.patch_size if transformer is not None else 2
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * self.patch_size)
        self.tokenizer_max_length = tokenizer.model_max_length if tokenizer is not None else CLIP_TOKENS
        self.default_sample_size = getattr(transformer, "sample_size", None) or 128

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """diffusers' `from_pretrained` for our FLUX folders and diffusers-format FLUX.1 folders and repos: their
        `FluxTransformer2DModel` is loaded with the same options (`dtype`, `variant`, ...) and converted to
        `MMDiTTransformer2DModel` (`from_flux`); their IP-Adapter image encoder and feature extractor are not loaded."""
        path = pretrained_model_name_or_path
        if not os.path.isdir(path):
            loading.register_with_diffusers()
        config = loading.pipeline_config(path, kwargs)
        if config is not None and not loading.is_flux_folder(path, kwargs):
            raise InputError(
                f"{path} is not a FLUX.1 pipeline: its model_index.json names {config.get('_class_name')!r}. Open it "
                "with `MMDiTPipeline.from_pretrained`, which picks the pipeline class for the folder."
            )
        expected, _ = cls._get_signature_keys(cls)
        loading.check_local_components(path, sorted(expected), cls._optional_components, kwargs)
        if "transformer" not in kwargs and loading.transformer_class_name(path, kwargs) == loading.FLUX_TRANSFORMER_CLASS:
            kwargs["transformer"] = loading.load_converted_flux_transformer(path, kwargs)
        skipped = [name for name in loading.unused_components(path, kwargs) if name not in kwargs]
        if skipped:
            logger.info(f"Not loading {skipped}: {cls.__name__} does not use FLUX.1's IP-Adapter components.")
        return super(MMDiTPipeline, cls).from_pretrained(path, **kwargs)

    # ----------------------------------------------------------------------------------------------------------
    # Text: MMDiTPipeline's encoding (one pass of each encoder over prompts and negatives) in FLUX.1's layout
    # ----------------------------------------------------------------------------------------------------------
    def _resolve_max_sequence_length(self, max_sequence_length: int | None) -> int:
        """Check `max_sequence_length` against the transformer's `txt_tokens`; `None` -> 512 or what fits."""
        transformer = getattr(self, "transformer", None)
        capacity = None if transformer is None else transformer.config.txt_tokens
        if max_sequence_length is None:
            return FLUX_T5_TOKENS if capacity is None else min(FLUX_T5_TOKENS, capacity)
        if not isinstance(max_sequence_length, int) or max_sequence_length < 1:
            raise InputError(f"`max_sequence_length` must be a positive integer; got {max_sequence_length!r}.")
        if capacity is not None and max_sequence_length > capacity:
            raise InputError(
                f"`max_sequence_length`={max_sequence_length} is too long: the transformer takes at most "
                f"txt_tokens={capacity} T5 tokens."
            )
        return max_sequence_length

    def _encode_text(self, prompts, prompts_2, prompts_3, device, clip_skip, max_sequence_length) -> TextConditioning:
        """FLUX.1's text conditioning: `prompts` for CLIP (pooled), `prompts_2` for T5 (sequence). There is no third
        encoder, and CLIP's hidden states are not used, so `prompts_3` and `clip_skip` play no part."""
        per_encoder = {"text_encoder": prompts, "text_encoder_2": prompts_2}
        return encode_text(self, per_encoder, max_sequence_length, device)

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        prompt_2: str | list[str] | None = None,
        device: torch.device | None = None,
        num_images_per_prompt: int = 1,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        max_sequence_length: int | None = None,
        lora_scale: float | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        return_attention_mask: bool = False,
    ):
        r"""
        Encode prompts to the transformer's text inputs, as FluxPipeline's `encode_prompt`.

        Args:
            prompt: The prompt(s) for CLIP, and for T5 unless `prompt_2` is given.
            prompt_2: The prompt(s) for T5.
            device: Where to run the encoders (default: the execution device).
            num_images_per_prompt: Each prompt's outputs are repeated this many times, in a row.
            prompt_embeds, pooled_prompt_embeds: Precomputed outputs, used instead of `prompt` (repeated per image).
            max_sequence_length: T5 tokens; `None` -> 512 or as many as the transformer's `txt_tokens` allows.
            lora_scale: Scales the text encoders' LoRAs while encoding (CLIP's and T5's, as FluxPipeline).
            prompt_attention_mask: Mask of precomputed embeddings [B, L] (ones if absent).
            return_attention_mask: Also return T5's token mask.

        Returns:
            `(prompt_embeds [B*n, L, D], pooled_prompt_embeds [B*n, P], text_ids [L, 3])` (zeros, FLUX.1's text
            position ids), with `return_attention_mask` also the mask [B*n, L] (long, 1 real, 0 padding).
        """
        embeds, _, pooled, _, mask, _ = super().encode_prompt(
            prompt,
            prompt_2,
            device=device,
            num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=False,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            max_sequence_length=max_sequence_length,
            lora_scale=lora_scale,
            return_attention_mask=True,
            prompt_attention_mask=prompt_attention_mask,
        )
        text_ids = torch.zeros(embeds.shape[1], 3, device=embeds.device, dtype=embeds.dtype)
        return (embeds, pooled, text_ids, mask) if return_attention_mask else (embeds, pooled, text_ids)

    # ----------------------------------------------------------------------------------------------------------
    # Latents and timesteps
    # ----------------------------------------------------------------------------------------------------------
    def _latent_layouts(self, batch_size, height, width) -> dict:
        """The shapes a caller's `latents` may have: [B, C, h, w], or FluxPipeline's packed [B, (h/2)(w/2), 4C]."""
        h, w = height // self.vae_scale_factor, width // self.vae_scale_factor
        p, channels = self.patch_size, self.transformer.in_channels
        return {"": (batch_size, channels, h, w), "FLUX's packed ": (batch_size, (h // p) * (w // p), channels * p * p)}

    def _initial_latents(self, latents, height, width, prompt, prompt_embeds, num_images_per_prompt):
        """The caller's `latents` (checked in `check_inputs`) as [B, C, h, w]: FluxPipeline's packed ones unpacked."""
        if latents is None or latents.ndim != 3:
            return latents
        h, w = height // self.vae_scale_factor, width // self.vae_scale_factor
        return unpatchify(latents, self.patch_size, h, w)

    def _timesteps(self, num_inference_steps, sigmas, mu, height, width, device):
        """FluxPipeline's schedule: `sigmas = linspace(1, 1/n, n)` unless given (or unless the scheduler makes its own,
        `use_flow_sigmas`), shifted by `mu` from the image token count when the scheduler shifts dynamically."""
        if self.scheduler.config.get("use_flow_sigmas", False):
            sigmas = None
        elif sigmas is None:
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        timesteps = super()._timesteps(num_inference_steps, sigmas, mu, height, width, device)
        self.scheduler.set_begin_index(0)  # as FluxPipeline
        return timesteps

    # ----------------------------------------------------------------------------------------------------------
    # Properties read by callbacks (as FluxPipeline)
    # ----------------------------------------------------------------------------------------------------------
    def _text_prefix_length(self) -> int:
        """FLUX.1's text sequence is T5's alone: CLIP gives only the pooled vector."""
        return 0

    @property
    def true_cfg_scale(self):
        return self._true_cfg_scale

    @property
    def do_classifier_free_guidance(self):
        """True classifier-free guidance (`true_cfg_scale > 1` with a negative prompt); distilled guidance is not."""
        return self._do_true_cfg

    # ----------------------------------------------------------------------------------------------------------
    # Where sampling differs from SD3's (`MMDiTPipeline._generate` / `_denoise` call these)
    # ----------------------------------------------------------------------------------------------------------
    def _encoder_prompts(self, prompt, prompt_2, prompt_3) -> dict:
        return {"text_encoder": prompt, "text_encoder_2": prompt if prompt_2 is None else prompt_2}

    def _cfg_scale_argument(self, guidance_scale) -> tuple[str, float]:
        """True classifier-free guidance is weighted by `true_cfg_scale`; `guidance_scale` is the distilled input."""
        scale = getattr(self, "_true_cfg_scale", None)  # set by `__call__`
        return "true_cfg_scale", self._call_default("true_cfg_scale", None) if scale is None else scale

    def _model_inputs(self, model_input: torch.Tensor) -> dict:
        """FLUX.1 [dev]'s `guidance` input: `guidance_scale` per row, where the transformer embeds it."""
        if not self.transformer.config.get("guidance_embeds", False):
            return {}
        return {"guidance": torch.full([model_input.shape[0]], self.guidance_scale, device=model_input.device,
                                       dtype=torch.float32)}

    def _step_end_callback(self, callback, step, t, latents, text, tensor_inputs):
        """As FluxPipeline, the callback sees (and may replace) the positive prompt's `prompt_embeds` only."""
        prompt_embeds, pooled_prompt_embeds, text_mask = text
        negative, positive = prompt_embeds.chunk(2) if self.do_classifier_free_guidance else (None, prompt_embeds)
        step_tensors = dict(latents=latents, prompt_embeds=positive)
        outputs = call_checks.callback_outputs(callback(self, step, t, {k: step_tensors[k] for k in tensor_inputs}))
        latents = outputs.pop("latents", latents)
        if "prompt_embeds" in outputs:
            positive = outputs.pop("prompt_embeds").to(prompt_embeds.dtype)
            prompt_embeds = positive if negative is None else torch.cat([negative, positive], dim=0)
        return latents, (prompt_embeds, pooled_prompt_embeds, text_mask)

    # ----------------------------------------------------------------------------------------------------------
    # Generation
    # ----------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    @replace_example_docstring(EXAMPLE)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        true_cfg_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (FluxPipeline's signature)
        max_sequence_length: int | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        mu: float | None = None,
    ) -> MMDiTPipelineOutput | tuple:
        r"""
        Generate images from text. Arguments as diffusers' `FluxPipeline` (without IP-Adapter), plus the masks and `mu`.

        Args:
            prompt (`str` or `list[str]`): What to draw; or pass `prompt_embeds`.
            prompt_2: Prompt(s) for T5 (default: `prompt`).
            negative_prompt, negative_prompt_2: What to guide away from with true classifier-free guidance.
            true_cfg_scale: True classifier-free guidance weight, applied when `> 1` and a negative prompt (or its
                embeddings) is given: two model calls per step, in one batch. Default: the folder's
                `sampler_defaults`, else 1.0.
            height, width: Image size in pixels, multiples of `vae_scale_factor * patch_size` (default: the
                transformer's `sample_size * vae_scale_factor`, 1024 for FLUX.1).
            num_inference_steps: Sampler steps (ignored with `sigmas`). Default: `sampler_defaults`, else 28.
            sigmas: Custom decreasing noise levels (default: `linspace(1, 1/n, n)`, then shifted by the scheduler).
            guidance_scale: Distilled guidance, the transformer's `guidance` input when its config has
                `guidance_embeds` (FLUX.1 [dev]); ignored otherwise. Default: `sampler_defaults`, else 3.5.
            num_images_per_prompt: Images per prompt.
            generator: A `torch.Generator`, or one per image (batch * num_images_per_prompt), for reproducibility.
            latents: Initial noise [batch * num_images_per_prompt, C, height / f, width / f], or FluxPipeline's packed
                [batch * num_images_per_prompt, (height / 2f) * (width / 2f), 4 C] (f: `vae_scale_factor`).
            prompt_embeds, pooled_prompt_embeds: Precomputed text conditioning (`encode_prompt`).
            negative_prompt_embeds, negative_pooled_prompt_embeds: Precomputed negative text conditioning.
            output_type: "pil", "np", "pt" or "latent" (normalised latents [B, C, h, w], not decoded).
            return_dict: Return an `MMDiTPipelineOutput` rather than a tuple.
            joint_attention_kwargs: Passed to the transformer; `{"scale": s}` scales the loaded LoRAs.
            callback_on_step_end: `f(pipe, step, timestep, callback_kwargs) -> dict` after every step; the returned
                `latents` ([B, C, h, w]) and `prompt_embeds` replace the pipeline's.
            callback_on_step_end_tensor_inputs: Which of those tensors the callback receives.
            max_sequence_length: T5 tokens (default 512, or fewer when the transformer's `txt_tokens` is smaller).
            prompt_attention_mask, negative_prompt_attention_mask: Token masks of precomputed embeddings [B, L]
                (1 real, 0 padding). Only transformers with `use_text_attention_mask` read them.
            mu: Dynamic-shift parameter; computed from the image token count when the scheduler shifts dynamically.

        Examples:
        """
        guidance_scale = self._call_default("guidance_scale", guidance_scale)
        true_cfg_scale = self._call_default("true_cfg_scale", true_cfg_scale)
        for name, value in (("guidance_scale", guidance_scale), ("true_cfg_scale", true_cfg_scale)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
                raise InputError(f"`{name}` must be a finite number; got {value!r}.")
        has_negative = negative_prompt is not None or negative_prompt_embeds is not None
        if true_cfg_scale > 1 and not has_negative:
            logger.warning(f"`true_cfg_scale`={true_cfg_scale} needs a `negative_prompt` (or its embeddings): sampling "
                           "without true classifier-free guidance.")
        self._true_cfg_scale = true_cfg_scale
        self._do_true_cfg = true_cfg_scale > 1 and has_negative
        # SD3's generation (checks, one encoding pass, sampling loop, decoding) with FLUX.1's differences: the
        # hooks above, `_timesteps`, `_initial_latents`, and `_encode_text`'s layout; no third prompt, no clip_skip,
        # no skip-layer guidance, no guidance rescale or CFG-Zero*, no IP-Adapter
        return self._generate(
            NoiseStart(), prompt=prompt, prompt_2=prompt_2, prompt_3=None, height=height, width=width,
            num_inference_steps=num_inference_steps, sigmas=sigmas, guidance_scale=guidance_scale,
            negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2, negative_prompt_3=None,
            num_images_per_prompt=num_images_per_prompt, generator=generator, latents=latents,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            prompt_attention_mask=prompt_attention_mask, negative_prompt_attention_mask=negative_prompt_attention_mask,
            output_type=output_type, return_dict=return_dict, joint_attention_kwargs=joint_attention_kwargs,
            clip_skip=None, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length, skip_guidance_layers=None, skip_layer_guidance_scale=0.0,
            skip_layer_guidance_stop=0.0, skip_layer_guidance_start=0.0, mu=mu, guidance_rescale=0.0,
            use_cfg_zero_star=False,
        )
