"""MMDiTPipeline: text-to-image with an `MMDiTTransformer2DModel`, SD3's flow-matching sampler and text encoders.

On SD3 / SD3.5 weights it gives the images of diffusers' `StableDiffusion3Pipeline` (same arguments, same numbers);
it also runs smaller layouts (one CLIP + T5, one CLIP) and models trained with the text padding masked out.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.guiders.classifier_free_zero_star_guidance import cfg_zero_star_scale
from diffusers.guiders.guider_utils import rescale_noise_cfg
from diffusers.image_processor import PipelineImageInput, VaeImageProcessor
from diffusers.models.autoencoders import AutoencoderKL
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.schedulers import FlowMatchEulerDiscreteScheduler
from diffusers.utils import BaseOutput, logging, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor
from transformers import (
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    SiglipImageProcessor,
    SiglipVisionModel,
    T5EncoderModel,
    T5TokenizerFast,
)

from ..errors import InputError
from ..models.transformer_mmdit import MMDiTTransformer2DModel
from . import call_checks, loading
from .execution_device import execution_device
from .ip_adapter import MMDiTIPAdapterMixin
from .latents import denormalize_latents, vae_scale_factor
from .lora import MMDiTLoraLoaderMixin, text_encoder_lora_scale
from .single_file import MMDiTSingleFilePipelineMixin
from .text_encoding import TextConditioning, encode_text, needs_second_clip, uses_text_mask

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
DEFAULT_T5_TOKENS = 256  # SD3's default `max_sequence_length`
CLIP_TOKENS = 77

EXAMPLE = """
    Examples:
        ```py
        >>> import torch
        >>> from mmdit_diffusers import MMDiTPipeline

        >>> # a diffusers-format SD3 / SD3.5 folder or repo: the transformer is converted on load
        >>> pipe = MMDiTPipeline.from_pretrained("stabilityai/stable-diffusion-3.5-medium", dtype=torch.bfloat16)
        >>> pipe.to("cuda")
        >>> image = pipe("a red circle left of a blue square", num_inference_steps=28, guidance_scale=5.0).images[0]
        ```
"""


# `__call__`'s defaults where the pipeline folder stores none: StableDiffusion3Pipeline's (it has neither guidance
# rescale nor CFG-Zero*: both off).
SD3_CALL_DEFAULTS = {"num_inference_steps": 28, "guidance_scale": 7.0, "guidance_rescale": 0.0,
                     "use_cfg_zero_star": False}
SECOND_CLIP = ("text_encoder_2", "tokenizer_2")
T5 = ("text_encoder_3", "tokenizer_3")
IMAGE_PROMPT = ("image_encoder", "feature_extractor")  # SD3.5's IP-Adapter parts, as SD3 declares them


class OptionalComponents:
    """`_optional_components`, which diffusers reads in two senses, answered in each.

    On the class (`from_pretrained`, `from_pipe`): the components a saved folder may leave out: T5, and the second
    CLIP, which transformers trained on one CLIP's pooled text (e.g. the Shapes pipeline) have none of, and the
    IP-Adapter's image encoder and feature extractor (`load_ip_adapter` adds them). On a pipeline
    (`save_pretrained`, diffusers' optional-component tests): what this pipeline runs without: T5 always (its part of
    the sequence becomes zeros, as SD3 without T5), the second CLIP only where the transformer does not take its
    pooled output (an SD3-layout transformer cannot run without it).
    """

    def __get__(self, pipe, owner=None) -> list[str]:
        if pipe is None:
            return [*SECOND_CLIP, *T5, *IMAGE_PROMPT]
        return [*T5, *IMAGE_PROMPT] if needs_second_clip(pipe) else [*SECOND_CLIP, *T5, *IMAGE_PROMPT]


@dataclass
class MMDiTPipelineOutput(BaseOutput):
    """`images`: a list of PIL images, a numpy array [B, H, W, 3] or a tensor [B, 3, H, W] in [0, 1]; latents
    [B, C, h, w] for `output_type="latent"`."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


class MMDiTPipeline(DiffusionPipeline, MMDiTLoraLoaderMixin, MMDiTIPAdapterMixin, MMDiTSingleFilePipelineMixin):
    r"""
    Text-to-image with the MMDiT (Esser et al. 2024): SD3's text conditioning and flow-matching Euler sampler.

    Args:
        transformer ([`MMDiTTransformer2DModel`]): Denoises the latents.
        scheduler ([`FlowMatchEulerDiscreteScheduler`]): The sampler (static `shift`, or dynamic shifting by `mu`).
        vae ([`AutoencoderKL`]): Latents <-> images; latents are normalised by the config's `scaling_factor` and
            `shift_factor`: `z = (encode(x) - shift_factor) * scaling_factor`.
        text_encoder ([`CLIPTextModelWithProjection`]) and tokenizer ([`CLIPTokenizer`]): The first CLIP.
        text_encoder_2, tokenizer_2: A second CLIP (SD3's OpenCLIP bigG), concatenated on channels. Needed where the
            transformer takes both CLIPs' pooled outputs (SD3's layout); `None` for one-CLIP transformers.
        text_encoder_3 ([`T5EncoderModel`], *optional*) and tokenizer_3 ([`T5TokenizerFast`], *optional*): T5, whose
            states follow the CLIP states in the sequence. Without it the T5 part is zeros, as SD3 without T5.
        image_encoder ([`SiglipVisionModel`], *optional*) and feature_extractor ([`SiglipImageProcessor`],
            *optional*): The image prompt's encoder of an IP-Adapter (SD3.5), as SD3; `load_ip_adapter` loads them.

    The text sequence is `[CLIP tokens (77, channels zero-padded to the T5 width); T5 tokens]`, the pooled vector the
    CLIP pooled outputs concatenated. Transformers with `use_text_attention_mask` also get the matching token mask
    (padding and absent-T5 zeros masked out); SD3 weights attend to everything, as they were trained.

    Loading: `MMDiTPipeline.from_pretrained(folder_or_repo)` reads our own folders and diffusers-format SD3 / SD3.5
    folders (the `SD3Transformer2DModel` is converted on load). `save_pretrained` also writes `pipeline.py`, so that
    `DiffusionPipeline.from_pretrained(folder, custom_pipeline="pipeline", trust_remote_code=True)` works too.
    Sharing on the Hub (model card, typed Hub errors) is `mmdit_diffusers.hub`'s `push_to_hub` / `from_pretrained`.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->image_encoder->transformer->vae"
    _optional_components = OptionalComponents()
    _callback_tensor_inputs = ["latents", "prompt_embeds", "pooled_prompt_embeds"]
    _sd3_call_defaults = SD3_CALL_DEFAULTS  # the SD3 pipeline's defaults this class follows

    def __init__(
        self,
        transformer: MMDiTTransformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        text_encoder_2: CLIPTextModelWithProjection | None = None,
        tokenizer_2: CLIPTokenizer | None = None,
        text_encoder_3: T5EncoderModel | None = None,
        tokenizer_3: T5TokenizerFast | None = None,
        image_encoder: SiglipVisionModel | None = None,
        feature_extractor: SiglipImageProcessor | None = None,
        sampler_defaults: dict[str, Any] | None = None,
    ):
        super().__init__()
        for encoder, tokenizer_, names in (
            (text_encoder_2, tokenizer_2, ("text_encoder_2", "tokenizer_2")),
            (text_encoder_3, tokenizer_3, ("text_encoder_3", "tokenizer_3")),
        ):
            if (encoder is None) != (tokenizer_ is None):
                raise ValueError(f"Pass `{names[0]}` and `{names[1]}` together, or neither.")
        self.register_modules(
            transformer=transformer,
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )
        self.register_sampler_defaults(**(sampler_defaults or {}))
        self.vae_scale_factor = vae_scale_factor(vae)
        # latent-channel tensors given as images are taken as latents (img2img, inpainting), as SD3's
        latent_channels = vae.config.latent_channels if vae is not None else 16
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, vae_latent_channels=latent_channels)
        self.tokenizer_max_length = tokenizer.model_max_length if tokenizer is not None else CLIP_TOKENS
        self.default_sample_size = getattr(transformer, "sample_size", None) or 128
        self.patch_size = transformer.config.patch_size if transformer is not None else 2

    def register_sampler_defaults(self, **defaults) -> None:
        """Store the sampler settings this pipeline samples well with (`num_inference_steps`, `guidance_scale`,
        `guidance_rescale`, `use_cfg_zero_star`) in its config: `save_pretrained` writes them to `model_index.json`
        (so a Hub push carries them), `from_pretrained` reads them back, and `__call__` uses them for the arguments its
        caller leaves out. The scheduler's own settings (shift, `stochastic_sampling`) already travel in
        `scheduler/scheduler_config.json`."""
        unknown = sorted(set(defaults) - set(self._sd3_call_defaults))
        if unknown:
            raise ValueError(f"`sampler_defaults` has unknown keys {unknown}; expected some of {sorted(self._sd3_call_defaults)}.")
        call_checks.check_guidance_options(defaults.get("guidance_rescale", 0.0),
                                           defaults.get("use_cfg_zero_star", False))
        self.register_to_config(sampler_defaults=dict(defaults) or None)

    def _call_default(self, name: str, value):
        """`value` when the caller passed one, else the folder's stored default, else SD3's."""
        if value is not None:
            return value
        return (self.config.get("sampler_defaults") or {}).get(name, self._sd3_call_defaults[name])

    def register_modules(self, **kwargs):
        """As diffusers, but our own classes are recorded by the package root (see `_name_components_by_package_root`)."""
        super().register_modules(**kwargs)
        self._name_components_by_package_root(kwargs)

    def _name_components_by_package_root(self, names) -> None:
        """Record our classes in `model_index.json` as `["mmdit_diffusers", "MMDiTTransformer2DModel"]` rather than
        diffusers' default, the defining module (`mmdit_diffusers.models.transformer_mmdit`): the root is the stable
        import path, valid when internal modules move."""
        for name in names:
            module = getattr(self, name, None)
            library, class_name = self.config.get(name) or (None, None)
            root_library = loading.package_root_library(library, class_name, type(module))
            if root_library != library:
                self.register_to_config(**{name: (root_library, class_name)})

    # ----------------------------------------------------------------------------------------------------------
    # Saving and loading
    # ----------------------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        """diffusers' `save_pretrained`, plus `pipeline.py`: a two-line module that imports `MMDiTPipeline` from
        `mmdit_diffusers`, so `DiffusionPipeline.from_pretrained(save_directory, custom_pipeline="pipeline",
        trust_remote_code=True)` loads it (also from the Hub, where `push_to_hub=True` uploads it too)."""
        self._name_components_by_package_root(self.components)  # also components set after construction
        loading.write_shim(save_directory, type(self).__name__)
        return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """diffusers' `from_pretrained`, also for diffusers-format SD3 / SD3.5 folders and repos: their
        `SD3Transformer2DModel` is loaded with the same options (`dtype`, `variant`, ...) and converted to
        `MMDiTTransformer2DModel` (an IP-Adapter image encoder and feature extractor are loaded as SD3 does). Before a
        Hub repo is loaded our package is registered with diffusers' loader (`loading.register_with_diffusers`).
        A FLUX.1 folder (diffusers' `FluxPipeline`, or one saved by `MMDiTFluxPipeline`) gives an
        `MMDiTFluxPipeline` (see there)."""
        path = pretrained_model_name_or_path
        if not os.path.isdir(path):
            loading.register_with_diffusers()
        if cls is MMDiTPipeline and loading.is_flux_folder(path, kwargs):
            from .pipeline_mmdit_flux import MMDiTFluxPipeline

            return MMDiTFluxPipeline.from_pretrained(path, **kwargs)
        expected, _ = cls._get_signature_keys(cls)
        loading.check_local_components(path, sorted(expected), cls._optional_components, kwargs)
        if "transformer" not in kwargs and loading.transformer_class_name(path, kwargs) == loading.SD3_TRANSFORMER_CLASS:
            kwargs["transformer"] = loading.load_converted_sd3_transformer(path, kwargs)
        return super().from_pretrained(path, **kwargs)

    @property
    def _execution_device(self) -> torch.device:
        """diffusers' answer (offload hooks, else the pipeline's device) without its 3 ms walk: see execution_device."""
        return execution_device(self)

    # ----------------------------------------------------------------------------------------------------------
    # Text
    # ----------------------------------------------------------------------------------------------------------
    @property
    def _uses_text_mask(self) -> bool:
        return uses_text_mask(self)

    def _text_prefix_length(self) -> int:
        return self.tokenizer_max_length if self.text_encoder is not None else 0

    def _resolve_max_sequence_length(self, max_sequence_length: int | None) -> int:
        """Check `max_sequence_length` against the transformer's text capacity; `None` -> 256 or what fits."""
        transformer = getattr(self, "transformer", None)
        capacity = None if transformer is None else transformer.config.txt_tokens - self._text_prefix_length()
        if max_sequence_length is None:
            return DEFAULT_T5_TOKENS if capacity is None else max(0, min(DEFAULT_T5_TOKENS, capacity))
        if not isinstance(max_sequence_length, int) or max_sequence_length < 0:
            raise InputError(f"`max_sequence_length` must be a non-negative integer; got {max_sequence_length!r}.")
        if max_sequence_length == 0 and self.text_encoder_3 is not None:
            raise InputError("`max_sequence_length` must be at least 1 with a T5 text encoder.")
        if capacity is not None and max_sequence_length > capacity:
            raise InputError(
                f"`max_sequence_length`={max_sequence_length} is too long: the transformer takes txt_tokens="
                f"{transformer.config.txt_tokens} text tokens, {self._text_prefix_length()} of them CLIP's, so at most "
                f"{capacity} T5 tokens."
            )
        return max_sequence_length

    def _encode_text(self, prompts, prompts_2, prompts_3, device, clip_skip, max_sequence_length) -> TextConditioning:
        """SD3's text conditioning of one batch of prompts (see `text_encoding`)."""
        per_encoder = {"text_encoder": prompts, "text_encoder_2": prompts_2, "text_encoder_3": prompts_3}
        return encode_text(self, per_encoder, max_sequence_length, device, clip_skip)

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        device: torch.device | None = None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        negative_prompt_3: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        clip_skip: int | None = None,
        max_sequence_length: int | None = None,
        lora_scale: float | None = None,
        return_attention_mask: bool = False,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
    ):
        r"""
        Encode prompts to the transformer's text inputs, as SD3's `encode_prompt`.

        Args:
            prompt: The prompt(s), for every text encoder unless `prompt_2` / `prompt_3` say otherwise.
            prompt_2, prompt_3: Prompt(s) for the second CLIP and for T5.
            device: Where to run the encoders (default: the execution device).
            num_images_per_prompt: Each prompt's outputs are repeated this many times, in a row.
            do_classifier_free_guidance: Also encode the negative prompt(s) (`""` when not given).
            negative_prompt, negative_prompt_2, negative_prompt_3: What to guide away from.
            prompt_embeds, pooled_prompt_embeds: Precomputed outputs, used instead of `prompt` (repeated per image).
            negative_prompt_embeds, negative_pooled_prompt_embeds: Precomputed negative outputs.
            clip_skip: Take the CLIP states this many layers before the penultimate one.
            max_sequence_length: T5 tokens; `None` -> 256 or as many as the transformer's `txt_tokens` allows.
            lora_scale: Scales the text encoders' LoRAs while encoding (the CLIPs', as SD3); `__call__` passes
                `joint_attention_kwargs["scale"]`.
            return_attention_mask: Also return the token masks.
            prompt_attention_mask, negative_prompt_attention_mask: Masks of precomputed embeddings (ones if absent).

        Returns:
            `(prompt_embeds [B*n, L, D], negative_prompt_embeds, pooled_prompt_embeds [B*n, P],
            negative_pooled_prompt_embeds)`, the negatives `None` without guidance; with `return_attention_mask`
            also `(prompt_attention_mask, negative_prompt_attention_mask)`, [B*n, L] long, 1 real, 0 padding.
        """
        device = device or self._execution_device
        max_sequence_length = self._resolve_max_sequence_length(max_sequence_length)

        texts = []  # (prompts, prompts_2, prompts_3) of the positive and the negative side, where not given
        if prompt_embeds is None:
            prompts = _as_list(prompt, "prompt")
            batch_size = len(prompts)
            texts.append((prompts, _prompt_list(prompt_2, prompts, "prompt_2"), _prompt_list(prompt_3, prompts, "prompt_3")))
        else:
            batch_size = prompt_embeds.shape[0]
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            negatives = _negative_list(negative_prompt, batch_size, "negative_prompt")
            texts.append((
                negatives,
                _negative_list(negative_prompt_2, batch_size, "negative_prompt_2", negatives),
                _negative_list(negative_prompt_3, batch_size, "negative_prompt_3", negatives),
            ))
        # one pass of each encoder over both sides (rows do not interact): half the calls of encoding them apart
        encoded = []
        if texts:
            columns = ([text for side in texts for text in side[i]] for i in range(3))
            with text_encoder_lora_scale(self, lora_scale):
                encoded = self._encode_text(*columns, device, clip_skip, max_sequence_length).split(batch_size)

        if prompt_embeds is None:
            positive = encoded.pop(0)
        else:
            positive = _given(prompt_embeds, pooled_prompt_embeds, prompt_attention_mask, device, "prompt")
        negative = None
        if do_classifier_free_guidance:
            if negative_prompt_embeds is None:
                negative = encoded.pop(0)
            else:
                negative = _given(
                    negative_prompt_embeds,
                    negative_pooled_prompt_embeds,
                    negative_prompt_attention_mask,
                    device,
                    "negative_prompt",
                )

        positive = positive.repeat(num_images_per_prompt)
        prompt_embeds, pooled_prompt_embeds, prompt_attention_mask = positive.embeds, positive.pooled, positive.mask
        negative_prompt_embeds = negative_pooled_prompt_embeds = negative_prompt_attention_mask = None
        if negative is not None:
            negative = negative.repeat(num_images_per_prompt)
            negative_prompt_embeds, negative_pooled_prompt_embeds = negative.embeds, negative.pooled
            negative_prompt_attention_mask = negative.mask
        # returned by name, as SD3's: diffusers' pipeline tests read `__call__` argument names off these statements
        if return_attention_mask:
            return (prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds,
                    prompt_attention_mask, negative_prompt_attention_mask)
        return prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds

    # ----------------------------------------------------------------------------------------------------------
    # Checks and latents
    # ----------------------------------------------------------------------------------------------------------
    def check_inputs(
        self,
        prompt,
        prompt_2,
        prompt_3,
        height,
        width,
        num_inference_steps=None,
        sigmas=None,
        negative_prompt=None,
        negative_prompt_2=None,
        negative_prompt_3=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        pooled_prompt_embeds=None,
        negative_pooled_prompt_embeds=None,
        prompt_attention_mask=None,
        negative_prompt_attention_mask=None,
        callback_on_step_end_tensor_inputs=None,
        output_type="pil",
        generator=None,
        num_images_per_prompt=1,
        latents=None,
        guidance_scale=None,
        clip_skip=None,
        callback_on_step_end=None,
        mu=None,
        joint_attention_kwargs=None,
        guidance_rescale=None,
        use_cfg_zero_star=None,
    ) -> tuple[int, int]:
        """Check a call before any model runs (diffusers' `check_inputs`, the one check of every MMDiT pipeline's
        `__call__`): raise an `InputError` (a `ValueError`) that names the argument for every input `__call__` cannot
        use, warn about what is legal but most likely not meant (`call_checks`), and return `(height, width)` in
        pixels (the model's default for None). `num_inference_steps`, `guidance_scale`, `guidance_rescale`,
        `use_cfg_zero_star` None: the pipeline's defaults (`sampler_defaults`)."""
        steps_given = num_inference_steps is not None
        num_inference_steps = self._call_default("num_inference_steps", num_inference_steps)
        cfg_name, cfg_scale = self._cfg_scale_argument(self._call_default("guidance_scale", guidance_scale))
        negatives = {"negative_prompt": negative_prompt, "negative_prompt_2": negative_prompt_2,
                     "negative_prompt_3": negative_prompt_3}
        multiple = self.vae_scale_factor * self.patch_size
        maximum = call_checks.max_pixels(self)
        default = self.default_sample_size * self.vae_scale_factor
        height = call_checks.image_side("height", height, default, multiple, maximum)
        width = call_checks.image_side("width", width, default, multiple, maximum)
        call_checks.check_guidance_scale(
            cfg_scale, any(negatives.values()) or negative_prompt_embeds is not None, cfg_name
        )
        if "guidance_rescale" in self._sd3_call_defaults:  # FLUX.1's pipelines have neither
            call_checks.check_guidance_options(self._call_default("guidance_rescale", guidance_rescale),
                                               self._call_default("use_cfg_zero_star", use_cfg_zero_star))
        call_checks.check_sigmas(sigmas, num_inference_steps if steps_given else None)
        call_checks.check_generator(generator)
        call_checks.check_embeds(self, prompt_embeds, pooled_prompt_embeds, "")
        call_checks.check_embeds(self, negative_prompt_embeds, negative_pooled_prompt_embeds, "negative_")
        call_checks.check_clip_skip(self, clip_skip)
        call_checks.check_sampler_extras(latents, mu, joint_attention_kwargs)
        call_checks.check_callback(callback_on_step_end)
        if isinstance(num_images_per_prompt, int) and num_images_per_prompt >= 1:
            images = call_checks.batch_size(prompt, prompt_embeds) * num_images_per_prompt
            steps = len(sigmas) if sigmas is not None else num_inference_steps
            if isinstance(steps, int):
                call_checks.check_memory(self, images, height, width, steps, cfg_scale, output_type)
        call_checks.warn_unknown_words(self, self._encoder_prompts(prompt, prompt_2, prompt_3))

        call_checks.check_steps(num_inference_steps, sigmas)
        call_checks.check_output(output_type, OUTPUT_TYPES, num_images_per_prompt,
                                 callback_on_step_end_tensor_inputs, self._callback_tensor_inputs)
        call_checks.check_prompts({"prompt": prompt, "prompt_2": prompt_2, "prompt_3": prompt_3}, negatives,
                                  prompt_embeds, negative_prompt_embeds)
        call_checks.check_embeds_pairs(prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds,
                                       negative_pooled_prompt_embeds)
        call_checks.check_attention_masks(prompt_attention_mask, prompt_embeds, negative_prompt_attention_mask,
                                          negative_prompt_embeds)
        batch_size = call_checks.batch_size(prompt, prompt_embeds)
        call_checks.check_generator_count(generator, batch_size, num_images_per_prompt)
        call_checks.check_latents_shape(latents, self._latent_layouts(batch_size * num_images_per_prompt, height, width))
        return height, width

    def _latent_layouts(self, batch_size, height, width) -> dict:
        """The shapes a caller's `latents` may have (a description -> shape): SD3's [B, C, h, w]."""
        factor = self.vae_scale_factor
        return {"": (batch_size, self.transformer.in_channels, height // factor, width // factor)}

    def prepare_latents(self, batch_size, num_channels_latents, height, width, dtype, device, generator, latents=None):
        """Gaussian noise [batch, C, height / vae_scale_factor, width / vae_scale_factor], or `latents` moved."""
        if latents is not None:
            return latents.to(device=device, dtype=dtype)
        shape = (batch_size, num_channels_latents, height // self.vae_scale_factor, width // self.vae_scale_factor)
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)

    def _timesteps(self, num_inference_steps, sigmas, mu, height, width, device):
        """The scheduler's timesteps; with dynamic shifting, `mu` from the image token count as SD3 unless given."""
        config = self.scheduler.config
        if mu is None and config.get("use_dynamic_shifting", None):
            side = self.vae_scale_factor * self.patch_size
            mu = resolution_shift_mu(
                (height // side) * (width // side),
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.16),
            )
        extra = {} if mu is None else {"mu": mu}
        if sigmas is not None:
            self.scheduler.set_timesteps(sigmas=sigmas, device=device, **extra)
        else:
            self.scheduler.set_timesteps(num_inference_steps, device=device, **extra)
        return self.scheduler.timesteps, len(self.scheduler.timesteps)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, output_type: str = "pil"):
        """Denormalised latents through the VAE decoder, post-processed to `output_type` ("pil", "np" or "pt")."""
        latents = denormalize_latents(latents, self.vae)
        image = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
        return self.image_processor.postprocess(image, output_type=output_type)

    # ----------------------------------------------------------------------------------------------------------
    # Properties read by callbacks (as SD3)
    # ----------------------------------------------------------------------------------------------------------
    @property
    def guidance_scale(self):
        return self._guidance_scale

    @property
    def guidance_rescale(self):
        return self._guidance_rescale

    @property
    def do_classifier_free_guidance(self):
        return self._guidance_scale > 1

    @property
    def clip_skip(self):
        return self._clip_skip

    @property
    def joint_attention_kwargs(self):
        return self._joint_attention_kwargs

    @property
    def num_timesteps(self):
        return self._num_timesteps

    @property
    def current_timestep(self):
        """The timestep of the step in progress, None outside sampling (diffusers' cache hooks read it)."""
        return self._current_timestep

    @property
    def interrupt(self):
        return self._interrupt

    @property
    def skip_guidance_layers(self):
        return self._skip_guidance_layers

    # ----------------------------------------------------------------------------------------------------------
    # Generation
    # ----------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    @replace_example_docstring(EXAMPLE)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
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
        Generate images from text. Arguments as diffusers' `StableDiffusion3Pipeline`, plus the masks.

        Args:
            prompt (`str` or `list[str]`): What to draw; or pass `prompt_embeds`.
            prompt_2, prompt_3: Prompt(s) for the second CLIP and for T5 (default: `prompt`).
            height, width: Image size in pixels, multiples of `vae_scale_factor * patch_size` (default: the
                transformer's `sample_size * vae_scale_factor`).
            num_inference_steps: Sampler steps (ignored with `sigmas`). Default: the folder's `sampler_defaults`
                (`register_sampler_defaults`), else SD3's 28.
            sigmas: Custom decreasing noise levels for the scheduler.
            guidance_scale: Classifier-free guidance weight; `<= 1` disables guidance (one model call per step).
                Default: the folder's `sampler_defaults`, else SD3's 7.0.
            negative_prompt, negative_prompt_2, negative_prompt_3: What to guide away from (default `""`).
            num_images_per_prompt: Images per prompt.
            generator: A `torch.Generator`, or one per image (batch * num_images_per_prompt), for reproducibility.
            latents: Initial noise [batch * num_images_per_prompt, C, height / f, width / f] instead of sampling.
            prompt_embeds, pooled_prompt_embeds: Precomputed text conditioning (`encode_prompt`).
            negative_prompt_embeds, negative_pooled_prompt_embeds: Precomputed negative text conditioning.
            prompt_attention_mask, negative_prompt_attention_mask: Token masks of precomputed embeddings [B, L]
                (1 real, 0 padding; ones when absent). Only models with `use_text_attention_mask` read them.
            ip_adapter_image: An image prompt for the loaded IP-Adapter (`load_ip_adapter`), one image for the batch.
            ip_adapter_image_embeds: Its precomputed image-encoder features instead (`prepare_ip_adapter_image_embeds`):
                [1, patches, width], or [2, patches, width] = [negative; positive] with guidance.
            output_type: "pil", "np", "pt" or "latent" (normalised latents, not decoded).
            return_dict: Return an `MMDiTPipelineOutput` rather than a tuple.
            joint_attention_kwargs: Passed to the transformer; `{"scale": s}` scales the loaded LoRAs.
            clip_skip: Take the CLIP states this many layers before the penultimate one.
            callback_on_step_end: `f(pipe, step, timestep, callback_kwargs) -> dict` after every step; the returned
                `latents`, `prompt_embeds`, `pooled_prompt_embeds` replace the pipeline's.
            callback_on_step_end_tensor_inputs: Which of those tensors the callback receives.
            max_sequence_length: T5 tokens (default 256, or fewer when the transformer's `txt_tokens` is smaller).
            skip_guidance_layers: Skip-layer guidance (SD3.5; SD3.5 Medium uses `[7, 8, 9]`): blocks the transformer
                skips in one more evaluation of the positive prompt per step; the guided velocity moves away from
                it by `skip_layer_guidance_scale * (v_positive - v_skipped)`. Needs classifier-free guidance.
            skip_layer_guidance_scale: Weight of that term (SD3's 2.8).
            skip_layer_guidance_start, skip_layer_guidance_stop: Fractions of the steps between which it applies:
                steps `i` with `start * steps < i < stop * steps` (SD3's 0.01 and 0.2).
            mu: Dynamic-shift parameter; computed from the image size when the scheduler shifts dynamically.
            guidance_rescale: Guidance rescale phi in [0, 1] (Lin et al. 2023, "Common Diffusion Noise Schedules and
                Sample Steps are Flawed", as SDXL's pipeline): the guided velocity is scaled to the per-image standard
                deviation of the conditional one and mixed with the unscaled one, `phi * rescaled + (1 - phi) *
                guided`; keeps large `guidance_scale` values from over-saturating. Default: the folder's
                `sampler_defaults`, else 0.0 (off, as SD3).
            use_cfg_zero_star: CFG-Zero* (Fan et al. 2025, "Improved Classifier-Free Guidance for Flow Matching
                Models"; the authors' SD3 pipeline's argument): the unconditional velocity is first scaled by its
                optimal projection on the conditional one, `s* = <v_pos, v_neg> / |v_neg|^2` per image, so
                `v = s* v_neg + guidance_scale * (v_pos - s* v_neg)` (without the paper's zeroed first steps).
                Default: the folder's `sampler_defaults`, else False (as SD3).

        Examples:
        """
        return self._generate(NoiseStart(), **call_arguments(locals()))

    def _generate(
        self,
        start: "NoiseStart",
        *,
        prompt, prompt_2, prompt_3, height, width, num_inference_steps, sigmas, guidance_scale,
        negative_prompt, negative_prompt_2, negative_prompt_3, num_images_per_prompt, generator, latents,
        prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds,
        prompt_attention_mask, negative_prompt_attention_mask, output_type, return_dict, joint_attention_kwargs,
        clip_skip, callback_on_step_end, callback_on_step_end_tensor_inputs, max_sequence_length,
        skip_guidance_layers, skip_layer_guidance_scale, skip_layer_guidance_stop, skip_layer_guidance_start, mu,
        guidance_rescale, use_cfg_zero_star, ip_adapter_image=None, ip_adapter_image_embeds=None,
    ) -> MMDiTPipelineOutput | tuple:
        """The generation of every MMDiT pipeline (arguments: `__call__`'s). `start` says where sampling starts: from
        noise (text-to-image), or from an image (`MMDiTImg2ImgPipeline`, `MMDiTInpaintPipeline`)."""
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        height, width = self.check_inputs(
            prompt, prompt_2, prompt_3, height, width,
            num_inference_steps=num_inference_steps,
            sigmas=sigmas,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            negative_prompt_3=negative_prompt_3,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            prompt_attention_mask=prompt_attention_mask,
            negative_prompt_attention_mask=negative_prompt_attention_mask,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            output_type=output_type,
            generator=generator,
            num_images_per_prompt=num_images_per_prompt,
            latents=latents,
            guidance_scale=guidance_scale,
            clip_skip=clip_skip,
            callback_on_step_end=callback_on_step_end,
            mu=mu,
            joint_attention_kwargs=joint_attention_kwargs,
            guidance_rescale=guidance_rescale,
            use_cfg_zero_star=use_cfg_zero_star,
        )
        num_inference_steps = self._call_default("num_inference_steps", num_inference_steps)
        guidance_scale = self._call_default("guidance_scale", guidance_scale)
        guidance_rescale = self._call_default("guidance_rescale", guidance_rescale)
        use_cfg_zero_star = self._call_default("use_cfg_zero_star", use_cfg_zero_star)
        latents = self._initial_latents(latents, height, width, prompt, prompt_embeds, num_images_per_prompt)
        self._check_skip_layer_guidance(
            skip_guidance_layers, skip_layer_guidance_scale, skip_layer_guidance_start, skip_layer_guidance_stop,
            guidance_scale,
        )
        start.check(self, output_type)
        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._use_cfg_zero_star = use_cfg_zero_star
        self._skip_guidance_layers = skip_guidance_layers
        self._skip_layer_guidance_scale = skip_layer_guidance_scale
        self._skip_layer_guidance_range = (skip_layer_guidance_start, skip_layer_guidance_stop)
        self._clip_skip = clip_skip
        self._joint_attention_kwargs = joint_attention_kwargs
        self._interrupt = False
        self._current_timestep = None
        device = self._execution_device

        # 1. Text conditioning; with guidance the batch is [negative; positive]
        (prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds,
         prompt_attention_mask, negative_prompt_attention_mask) = MMDiTPipeline.encode_prompt(  # subclasses' differ
            self,
            prompt=prompt,
            prompt_2=prompt_2,
            prompt_3=prompt_3,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            negative_prompt_3=negative_prompt_3,
            do_classifier_free_guidance=self.do_classifier_free_guidance,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            prompt_attention_mask=prompt_attention_mask,
            negative_prompt_attention_mask=negative_prompt_attention_mask,
            device=device,
            clip_skip=clip_skip,
            num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=max_sequence_length,
            return_attention_mask=True,
            lora_scale=(joint_attention_kwargs or {}).get("scale"),
        )
        batch_size = prompt_embeds.shape[0]  # prompts x num_images_per_prompt
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds], dim=0)
            pooled_prompt_embeds = torch.cat([negative_pooled_prompt_embeds, pooled_prompt_embeds], dim=0)
            prompt_attention_mask = torch.cat([negative_prompt_attention_mask, prompt_attention_mask], dim=0)
        text_mask = prompt_attention_mask if self._uses_text_mask else None
        dtype = self.transformer.dtype  # SD3 uses the text encoders' dtype: the same unless they differ
        prompt_embeds, pooled_prompt_embeds = prompt_embeds.to(dtype), pooled_prompt_embeds.to(dtype)

        # 2. Timesteps, and the latents they start from
        timesteps, num_inference_steps = self._timesteps(num_inference_steps, sigmas, mu, height, width, device)
        timesteps, num_inference_steps = start.timesteps(self, timesteps, num_inference_steps)
        self._num_timesteps = len(timesteps)
        self._joint_attention_kwargs = self.ip_adapter_attention_kwargs(
            joint_attention_kwargs, ip_adapter_image, ip_adapter_image_embeds, batch_size, device
        )
        latents = start.latents(self, batch_size, height, width, dtype, device, generator, latents, timesteps)

        # 3. Denoising
        latents = self._denoise(
            start, latents, timesteps, num_inference_steps, (prompt_embeds, pooled_prompt_embeds, text_mask),
            generator, callback_on_step_end, callback_on_step_end_tensor_inputs,
        )

        # 4. Images
        image = latents if output_type == "latent" else start.images(self, latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return MMDiTPipelineOutput(images=image)

    def _denoise(self, start, latents, timesteps, num_inference_steps, text, generator, callback_on_step_end,
                 callback_on_step_end_tensor_inputs) -> torch.Tensor:
        """The sampling loop: per step one guided velocity, a scheduler step, `start.after_step` (inpainting puts
        the known region back), the callback. `text`: (prompt_embeds, pooled_prompt_embeds, text mask or None)."""
        prompt_embeds, pooled_prompt_embeds, text_mask = text
        num_warmup_steps = max(len(timesteps) - num_inference_steps * self.scheduler.order, 0)
        # a stochastic scheduler (e.g. `stochastic_sampling=True`) draws its step noise from the caller's generator
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
                velocity = self._guided_velocity(
                    start.model_input(model_input), t, prompt_embeds, pooled_prompt_embeds, text_mask,
                    skip_layers=self._skip_layers_at(i, num_inference_steps),
                )
                latents = self.scheduler.step(velocity, t, latents, return_dict=False, **step_kwargs)[0]
                latents = start.after_step(self, i, timesteps, latents)

                if callback_on_step_end is not None:
                    latents, (prompt_embeds, pooled_prompt_embeds, text_mask) = self._step_end_callback(
                        callback_on_step_end, i, t, latents, (prompt_embeds, pooled_prompt_embeds, text_mask),
                        callback_on_step_end_tensor_inputs,
                    )

                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()
        self._current_timestep = None
        return latents

    def _step_end_callback(self, callback, step, t, latents, text, tensor_inputs):
        """Call `callback_on_step_end` with the tensors it asked for (SD3's: the model's text inputs, both halves of
        the guidance batch) and take back what it replaces; returns `(latents, text)`."""
        prompt_embeds, pooled_prompt_embeds, text_mask = text
        step_tensors = dict(latents=latents, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds)
        outputs = call_checks.callback_outputs(callback(self, step, t, {k: step_tensors[k] for k in tensor_inputs}))
        latents = outputs.pop("latents", latents)
        prompt_embeds = outputs.pop("prompt_embeds", prompt_embeds)
        pooled_prompt_embeds = outputs.pop("pooled_prompt_embeds", pooled_prompt_embeds)
        return latents, (prompt_embeds, pooled_prompt_embeds, text_mask)

    # Where subclasses (`MMDiTFluxPipeline`) differ from SD3; SD3's answers here.
    def _encoder_prompts(self, prompt, prompt_2, prompt_3) -> dict:
        """The prompt(s) each text encoder reads (for the call checks)."""
        return {"text_encoder": prompt, "text_encoder_2": prompt if prompt_2 is None else prompt_2,
                "text_encoder_3": prompt if prompt_3 is None else prompt_3}

    def _cfg_scale_argument(self, guidance_scale) -> tuple[str, float]:
        """The classifier-free guidance weight: its argument's name and value (SD3's: `guidance_scale`)."""
        return "guidance_scale", guidance_scale

    def _initial_latents(self, latents, height, width, prompt, prompt_embeds, num_images_per_prompt):
        """The caller's `latents` (checked in `check_inputs`) in the [B, C, h, w] layout of the sampler (SD3's are)."""
        return latents

    def _model_inputs(self, model_input: torch.Tensor) -> dict:
        """Transformer inputs besides the latents, the text and the timestep (SD3: none)."""
        return {}

    def _guided_velocity(self, model_input, t, prompt_embeds, pooled_prompt_embeds, text_mask, skip_layers=None):
        """The velocity of one step: one transformer call for both halves of the guidance batch, then
        `v = v_neg + guidance_scale * (v_pos - v_neg)` (with `use_cfg_zero_star`, `v_neg` scaled by CFG-Zero*'s
        `s*` first: diffusers' `cfg_zero_star_scale`); with `skip_layers` (skip-layer guidance, SD3.5) one more call
        on the positive half with those blocks skipped, and `v += skip_layer_guidance_scale * (v_pos - v_skipped)`;
        with `guidance_rescale` > 0, `v` rescaled toward `v_pos`'s standard deviation (diffusers' `rescale_noise_cfg`,
        SDXL's, here on the velocity)."""
        velocity = self._velocity(
            "cond",
            hidden_states=model_input,
            encoder_hidden_states=prompt_embeds,
            pooled_projections=pooled_prompt_embeds,
            timestep=t.expand(model_input.shape[0]),
            encoder_attention_mask=text_mask,
            **self._model_inputs(model_input),
        )
        if not self.do_classifier_free_guidance:
            return velocity
        uncond, cond = velocity.chunk(2)
        if self._use_cfg_zero_star:
            optimal_scale = cfg_zero_star_scale(cond.flatten(1), uncond.flatten(1))  # [B, 1]
            uncond = uncond * optimal_scale.view(-1, *(1,) * (uncond.ndim - 1))
        velocity = uncond + self._cfg_scale_argument(self.guidance_scale)[1] * (cond - uncond)
        if skip_layers:
            positive_input, positive_embeds, positive_pooled = (x.chunk(2)[1] for x in (model_input, prompt_embeds, pooled_prompt_embeds))
            skipped = self._velocity(
                "skip_layers",
                hidden_states=positive_input,
                encoder_hidden_states=positive_embeds,
                pooled_projections=positive_pooled,
                timestep=t.expand(positive_input.shape[0]),
                encoder_attention_mask=None if text_mask is None else text_mask.chunk(2)[1],
                skip_layers=skip_layers,
                **self._model_inputs(positive_input),
            )
            velocity = velocity + (cond - skipped) * self._skip_layer_guidance_scale
        if self._guidance_rescale > 0:
            velocity = rescale_noise_cfg(velocity, cond, self._guidance_rescale)
        return velocity

    def _velocity(self, cache_context: str, **inputs) -> torch.Tensor:
        """One transformer call on `inputs`, with `joint_attention_kwargs`, in the transformer's cache context named
        `cache_context` (diffusers' cache hooks keep one state per context, as in diffusers' FLUX pipeline).
        `MMDiTControlNetPipeline` adds the ControlNet's residuals here."""
        with self.transformer.cache_context(cache_context):
            return self.transformer(**inputs, joint_attention_kwargs=self.joint_attention_kwargs, return_dict=False)[0]

    def _skip_layers_at(self, step: int, num_inference_steps: int) -> list[int] | None:
        """The blocks skip-layer guidance skips at `step`, None where it does not apply (SD3's rule: guidance on,
        `start * steps < step < stop * steps`)."""
        begin, end = self._skip_layer_guidance_range
        if self._skip_guidance_layers is None or not self.do_classifier_free_guidance:
            return None
        if not (step > num_inference_steps * begin and step < num_inference_steps * end):
            return None
        return list(self._skip_guidance_layers)

    def _check_skip_layer_guidance(self, layers, scale, begin, end, guidance_scale) -> None:
        if layers is None:
            return
        depth = len(self.transformer.transformer_blocks)
        if not isinstance(layers, (list, tuple)) or not all(isinstance(i, int) and 0 <= i < depth for i in layers):
            raise InputError(
                f"`skip_guidance_layers` must be a list of block indices in [0, {depth}) (the transformer has {depth} "
                f"blocks); got {layers!r}."
            )
        for name, value in (("skip_layer_guidance_start", begin), ("skip_layer_guidance_stop", end)):
            if not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise InputError(f"`{name}` must be a fraction of the steps in [0, 1]; got {value!r}.")
        if not isinstance(scale, (int, float)):
            raise InputError(f"`skip_layer_guidance_scale` must be a number; got {scale!r}.")
        if guidance_scale <= 1:
            logger.warning("`skip_guidance_layers` has no effect without classifier-free guidance (guidance_scale > 1).")


class NoiseStart:
    """Where sampling starts, for text-to-image: Gaussian noise at the first timestep, decoded at the end.

    The hooks `_generate` calls, which `MMDiTImg2ImgPipeline` / `MMDiTInpaintPipeline` implement to start from an
    image instead: `check` (their inputs), `timesteps` (cut by `strength`), `latents` (the starting latents),
    `model_input` (extra input channels), `after_step` (put the known region back), `images` (decode).
    """

    def check(self, pipe, output_type) -> None:
        pass

    def timesteps(self, pipe, timesteps, num_inference_steps):
        return timesteps, num_inference_steps

    def latents(self, pipe, batch_size, height, width, dtype, device, generator, latents, timesteps):
        channels = pipe.transformer.in_channels
        return pipe.prepare_latents(batch_size, channels, height, width, dtype, device, generator, latents)

    def model_input(self, model_input):
        return model_input

    def after_step(self, pipe, step, timesteps, latents):
        return latents

    def images(self, pipe, latents, output_type):
        return pipe.decode_latents(latents, output_type)


def call_arguments(call_locals: dict, *start_arguments: str) -> dict:
    """A pipeline `__call__`'s arguments (its `locals()`, read first thing) for `_generate`: all but `self` and the
    ones its start object takes (`start_arguments`)."""
    return {k: v for k, v in call_locals.items() if k not in ("self", "__class__", *start_arguments)}


def resolution_shift_mu(image_tokens: int, base_tokens: int, max_tokens: int, base_shift: float, max_shift: float) -> float:
    """SD3 / FLUX dynamic shifting: `mu` grows linearly with the image token count, from `base_shift` at
    `base_tokens` to `max_shift` at `max_tokens`. (diffusers' `calculate_shift`; importing it from the SD3 pipeline
    module pulls in its image processors, which warn without torchvision.)"""
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    return image_tokens * slope + base_shift - slope * base_tokens


def _as_list(prompt, name: str) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise InputError(f"`{name}` must be a string or a non-empty list of strings; got {prompt!r}.")
    return prompts


def _prompt_list(prompt, default: list[str], name: str) -> list[str]:
    """`prompt_2` / `prompt_3`: `prompt` when not given, else one per prompt."""
    if prompt is None:
        return default
    prompts = _as_list(prompt, name)
    if len(prompts) != len(default):
        raise InputError(f"`{name}` has {len(prompts)} prompts but `prompt` has {len(default)}.")
    return prompts


def _negative_list(negative, batch_size: int, name: str, default: list[str] | None = None) -> list[str]:
    """A negative prompt per prompt: a string is repeated; missing -> `default` or `""`."""
    if negative is None:
        return default if default is not None else [""] * batch_size
    if isinstance(negative, str):
        return [negative] * batch_size
    negatives = _as_list(negative, name)
    if len(negatives) != batch_size:
        raise InputError(f"`{name}` has {len(negatives)} prompts but the batch has {batch_size}.")
    return negatives


def _given(embeds, pooled, mask, device, name: str) -> TextConditioning:
    """Precomputed embeddings; a missing mask is all ones (every token real)."""
    if pooled is None:
        pooled_name = "negative_pooled_prompt_embeds" if name.startswith("negative") else "pooled_prompt_embeds"
        raise InputError(f"`{name}_embeds` needs `{pooled_name}` too.")
    if mask is None:
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=device)
    return TextConditioning(embeds.to(device), pooled.to(device), mask.to(device=device, dtype=torch.long))
