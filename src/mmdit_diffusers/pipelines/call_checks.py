"""The checks of a pipeline call, before any model runs, one function per check; `MMDiTPipeline.check_inputs` (the one
entry, diffusers' name) runs them in turn. Each refuses what cannot work with an `InputError` that names the argument,
the value and what is expected (sizes in pixels, with the model's maximum), or warns about what is legal but most
likely not meant.

Refused: a size that is not a positive whole number of pixels, not a multiple of `vae_scale_factor * patch_size` or
beyond the model's position grid; a `guidance_scale` that is not a finite number >= 0; a `guidance_rescale` not in
[0, 1] or a `use_cfg_zero_star` not a bool; `sigmas` that are not noise levels in [0, 1], or disagree with an
explicit `num_inference_steps`; a `generator` that is not a `torch.Generator`; precomputed embeddings of another
width or rank than the transformer reads; a `clip_skip` beyond the CLIP's layers; integer `latents` or latents of
another shape than the call's noise, a `mu` or LoRA scale that is not a finite number; a call whose memory, known
from its steps, images and size, exceeds what the machine has (`memory_needed` against `available_memory`).

Warned (logged, the call goes on): `guidance_scale` below 1 (guidance is off, as at 1), a negative prompt while
guidance is off (it is not used), and prompt words a tokenizer does not know (`unknown_words`: spelled letter by
letter or mapped to its unknown token), which the model then most likely ignores.
"""

from __future__ import annotations

import math
import numbers
import os
import re

import torch
from diffusers.utils import logging

from ..errors import InputError
from .text_encoding import TEXT_ENCODERS

logger = logging.get_logger(__name__)

# Host memory per sampler step, measured (torch 2.13, diffusers' FlowMatchEulerDiscreteScheduler): ~32 bytes of
# scheduler tables and ~0.6 kB for the one 0-d tensor per step that iterating over the timestep tensor (`for t in
# timesteps`, as diffusers' pipelines do) creates up front.
BYTES_PER_STEP = 640
GIB = 2**30


# ----------------------------------------------------------------------------------------------------------
# Sizes
# ----------------------------------------------------------------------------------------------------------
def max_pixels(pipe) -> int | None:
    """The largest height / width the transformer's sin-cos position grid covers, in pixels (None: no limit)."""
    transformer = getattr(pipe, "transformer", None)
    grid = getattr(transformer, "pos_grid_size", None)
    if grid is None or getattr(transformer.config, "pos_embed_type", "sincos") != "sincos":
        return None
    return grid * pipe.patch_size * pipe.vae_scale_factor


def image_side(name: str, value, default: int, multiple: int, maximum: int | None) -> int:
    """`height` / `width` in pixels: None -> `default`; a whole number (`64`, `64.0`, a numpy integer) -> int."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value).is_integer():
        raise InputError(f"`{name}`={value!r} must be a whole number of pixels (a positive multiple of "
                         f"vae_scale_factor * patch_size = {multiple}).")
    pixels = int(value)
    if pixels <= 0 or pixels % multiple:
        suggestion = max(multiple, pixels - pixels % multiple)
        raise InputError(f"`{name}`={pixels} px must be a positive multiple of vae_scale_factor * patch_size = "
                         f"{multiple} px (e.g. {suggestion}).")
    if maximum is not None and pixels > maximum:
        raise InputError(f"`{name}`={pixels} px is larger than this model draws: at most {maximum} px (its position "
                         f"grid, pos_embed_max_size x patch_size x vae_scale_factor).")
    return pixels


# ----------------------------------------------------------------------------------------------------------
# Sampler arguments
# ----------------------------------------------------------------------------------------------------------
def check_guidance_scale(guidance_scale, negative_given: bool, name: str = "guidance_scale") -> None:
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real) \
            or not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise InputError(f"`{name}`={guidance_scale!r} must be a finite number >= 0 (> 1 turns "
                         "classifier-free guidance on; 1 or less is the prompt alone).")
    if guidance_scale < 1:
        logger.warning(f"`{name}`={guidance_scale} is below 1: classifier-free guidance is off, and the "
                       f"images are those of {name}=1 (the prompt alone). Use a value > 1 to guide.")
    if guidance_scale <= 1 and negative_given:
        logger.warning(f"The negative prompt is not used: `{name}`={guidance_scale} <= 1 turns "
                       "classifier-free guidance off. Use a value > 1 for the negative prompt to act.")


def check_guidance_options(guidance_rescale, use_cfg_zero_star) -> None:
    """`guidance_rescale` (phi): a number in [0, 1], the weight of the rescaled guided prediction;
    `use_cfg_zero_star`: a bool."""
    if isinstance(guidance_rescale, bool) or not isinstance(guidance_rescale, numbers.Real) \
            or not 0 <= guidance_rescale <= 1:
        raise InputError(f"`guidance_rescale`={guidance_rescale!r} must be a number in [0, 1] (0 is off; 0.7 is "
                         "Lin et al.'s choice).")
    if not isinstance(use_cfg_zero_star, bool):
        raise InputError(f"`use_cfg_zero_star` must be True or False; got {use_cfg_zero_star!r}.")


def check_sigmas(sigmas, num_inference_steps: int | None) -> None:
    """`sigmas`: a non-empty, non-increasing sequence of noise levels in [0, 1]; `num_inference_steps`, when the
    caller gave it too, must equal its length."""
    if sigmas is None:
        return
    try:
        values = [float(s) for s in (sigmas.tolist() if hasattr(sigmas, "tolist") else sigmas)]
    except (TypeError, ValueError):
        raise InputError(f"`sigmas` must be a sequence of numbers (noise levels in [0, 1]); got {sigmas!r}.") from None
    if not values:
        raise InputError("`sigmas` is empty; pass at least one noise level, or `num_inference_steps` instead.")
    bad = [s for s in values if not (math.isfinite(s) and 0.0 <= s <= 1.0)]
    if bad:
        raise InputError(f"`sigmas` holds {bad[0]!r}; noise levels are finite numbers in [0, 1].")
    if any(later > earlier for earlier, later in zip(values, values[1:])):
        raise InputError(f"`sigmas` must go down (from noise to image); got {values}.")
    if num_inference_steps is not None and num_inference_steps != len(values):
        raise InputError(f"`sigmas` has {len(values)} values but `num_inference_steps`={num_inference_steps}: with "
                         "`sigmas` the sampler takes one step per value; pass only one of them.")


def check_sampler_extras(latents, mu, joint_attention_kwargs) -> None:
    """`latents`: a floating-point tensor (its shape is checked with the size); `mu`: a finite number;
    `joint_attention_kwargs`: a dict whose "scale" (the LoRA scale) is a finite number."""
    if latents is not None and (not isinstance(latents, torch.Tensor) or not latents.is_floating_point()):
        kind = latents.dtype if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise InputError(f"`latents` must be a floating-point tensor (initial noise); got {kind}.")
    if mu is not None and (isinstance(mu, bool) or not isinstance(mu, numbers.Real) or not math.isfinite(mu)):
        raise InputError(f"`mu` must be a finite number (the dynamic shift); got {mu!r}.")
    if joint_attention_kwargs is None:
        return
    if not isinstance(joint_attention_kwargs, dict):
        raise InputError(f"`joint_attention_kwargs` must be a dict; got {type(joint_attention_kwargs).__name__}.")
    scale = joint_attention_kwargs.get("scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise InputError(f"`joint_attention_kwargs['scale']` (the LoRA scale) must be a finite number; got {scale!r}.")


def check_generator(generator) -> None:
    generators = generator if isinstance(generator, (list, tuple)) else [generator]
    if generator is None:
        return
    wrong = [g for g in generators if not isinstance(g, torch.Generator)]
    if wrong or not generators:
        raise InputError(f"`generator` must be a torch.Generator (e.g. torch.Generator('cuda').manual_seed(0)) or a "
                         f"list of them, one per image; got {wrong[0] if wrong else generator!r}.")


def check_generator_count(generator, batch_size: int, num_images_per_prompt: int) -> None:
    """A list of generators: one per image (`batch_size` prompts x `num_images_per_prompt`)."""
    effective = batch_size * num_images_per_prompt
    if isinstance(generator, list) and len(generator) != effective:
        raise InputError(
            f"`generator` is a list of {len(generator)} generators, but the effective batch size is {effective} "
            f"({batch_size} prompts x num_images_per_prompt={num_images_per_prompt}); pass one per image."
        )


def check_steps(num_inference_steps, sigmas) -> None:
    if sigmas is None and (not isinstance(num_inference_steps, int) or num_inference_steps < 1):
        raise InputError(f"`num_inference_steps` must be an integer >= 1; got {num_inference_steps!r}.")


def check_output(output_type, output_types, num_images_per_prompt, tensor_inputs, allowed_tensor_inputs) -> None:
    """`output_type` one of `output_types`; `num_images_per_prompt` >= 1; `callback_on_step_end_tensor_inputs` among
    the tensors the pipeline hands its callback (`allowed_tensor_inputs`)."""
    if output_type not in output_types:
        raise InputError(f"Unknown `output_type` {output_type!r}; expected one of {output_types}.")
    if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
        raise InputError(f"`num_images_per_prompt` must be an integer >= 1; got {num_images_per_prompt!r}.")
    unknown = [k for k in tensor_inputs or [] if k not in allowed_tensor_inputs]
    if unknown:
        raise InputError(
            f"`callback_on_step_end_tensor_inputs` has unknown names {unknown}; expected some of "
            f"{allowed_tensor_inputs}."
        )


def check_clip_skip(pipe, clip_skip) -> None:
    if clip_skip is None:
        return
    encoder = getattr(pipe, "text_encoder", None)
    layers = getattr(getattr(encoder, "config", None), "num_hidden_layers", None)
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or clip_skip < 0 or \
            (layers is not None and clip_skip > layers - 1):
        limit = f" at most {layers - 1} for this {layers}-layer CLIP" if layers is not None else ""
        raise InputError(f"`clip_skip`={clip_skip!r} must be an integer >= 0,{limit} (the layers skipped before the "
                         "penultimate one).")


# ----------------------------------------------------------------------------------------------------------
# Precomputed text conditioning
# ----------------------------------------------------------------------------------------------------------
def check_callback(callback_on_step_end) -> None:
    if callback_on_step_end is not None and not callable(callback_on_step_end):
        raise InputError(f"`callback_on_step_end` must be callable (pipe, step, timestep, kwargs) -> dict; got "
                         f"{type(callback_on_step_end).__name__}.")


def callback_outputs(outputs) -> dict:
    """What a `callback_on_step_end` returned: a dict of the tensors it replaces (None: nothing replaced)."""
    if outputs is None:
        return {}
    if not isinstance(outputs, dict):
        raise InputError(f"`callback_on_step_end` must return a dict of the tensors it changes (or None); it returned "
                         f"a {type(outputs).__name__}.")
    return outputs


def _rows(tensor) -> int:
    return tensor.shape[0] if isinstance(tensor, torch.Tensor) and tensor.ndim else 1


def check_embeds(pipe, embeds, pooled, prefix: str) -> None:
    """`{prefix}prompt_embeds` [B, L, txt_dim] with L <= txt_tokens and `{prefix}pooled_prompt_embeds` [B, cond_dim],
    floating point, as the transformer reads them."""
    config = pipe.transformer.config
    cond_dim = pipe.transformer.resolved_config["cond_dim"]
    for name, value, expected in ((f"{prefix}prompt_embeds", embeds, f"[B, L <= {config.txt_tokens}, "
                                   f"txt_dim={config.txt_dim}]"),
                                  (f"{prefix}pooled_prompt_embeds", pooled, f"[B, cond_dim={cond_dim}]")):
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise InputError(f"`{name}` must be a tensor {expected}; got {type(value).__name__}.")
        if not value.is_floating_point():
            raise InputError(f"`{name}` is {value.dtype}; embeddings are floating point {expected}.")
    if embeds is not None:
        if embeds.ndim != 3 or embeds.shape[-1] != config.txt_dim or embeds.shape[1] > config.txt_tokens:
            raise InputError(f"`{prefix}prompt_embeds` has shape {tuple(embeds.shape)}; this transformer reads "
                             f"[B, L <= {config.txt_tokens}, txt_dim={config.txt_dim}].")
    if pooled is not None:
        if pooled.ndim != 2 or pooled.shape[-1] != cond_dim:
            raise InputError(f"`{prefix}pooled_prompt_embeds` has shape {tuple(pooled.shape)}; this transformer "
                             f"reads [B, cond_dim={cond_dim}].")
    if embeds is not None and pooled is not None and embeds.shape[0] != pooled.shape[0]:
        raise InputError(f"`{prefix}prompt_embeds` holds {embeds.shape[0]} prompts but `{prefix}pooled_prompt_embeds` "
                         f"{pooled.shape[0]}; take both from one `encode_prompt` call.")


def check_prompts(prompts: dict[str, object], negatives: dict[str, object], prompt_embeds,
                  negative_prompt_embeds) -> None:
    """Text or embeddings, not both: `prompts` / `negatives` map each prompt argument's name to its value."""
    prompt = prompts.get("prompt")
    if prompt is not None and prompt_embeds is not None:
        raise InputError("Pass either `prompt` or `prompt_embeds`, not both.")
    if prompt is None and prompt_embeds is None:
        raise InputError("Pass `prompt` or `prompt_embeds` (with `pooled_prompt_embeds`).")
    for name, value in prompts.items():
        if name != "prompt" and value is not None and prompt_embeds is not None:
            raise InputError(f"Pass either `{name}` or `prompt_embeds`, not both.")
    for name, value in prompts.items():
        if value is not None and not isinstance(value, (str, list)):
            raise InputError(f"`{name}` must be a string or a list of strings; got {type(value).__name__}.")
    for name, value in negatives.items():
        if value is not None and negative_prompt_embeds is not None:
            raise InputError(f"Pass either `{name}` or `negative_prompt_embeds`, not both.")


def check_embeds_pairs(prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds,
                       negative_pooled_prompt_embeds) -> None:
    """Embeddings come with their pooled vectors, and the negative ones in the positive ones' shapes."""
    if prompt_embeds is not None and pooled_prompt_embeds is None:
        raise InputError(
            "`prompt_embeds` needs `pooled_prompt_embeds` too: take both from the same `encode_prompt` call."
        )
    if negative_prompt_embeds is not None and negative_pooled_prompt_embeds is None:
        raise InputError(
            "`negative_prompt_embeds` needs `negative_pooled_prompt_embeds` too: take both from the same "
            "`encode_prompt` call."
        )
    if prompt_embeds is not None and negative_prompt_embeds is not None:
        if prompt_embeds.shape != negative_prompt_embeds.shape:
            raise InputError(
                f"`negative_prompt_embeds` has shape {tuple(negative_prompt_embeds.shape)} but `prompt_embeds` "
                f"{tuple(prompt_embeds.shape)}; they must match."
            )
        if pooled_prompt_embeds.shape != negative_pooled_prompt_embeds.shape:
            raise InputError(
                f"`negative_pooled_prompt_embeds` has shape {tuple(negative_pooled_prompt_embeds.shape)} but "
                f"`pooled_prompt_embeds` {tuple(pooled_prompt_embeds.shape)}; they must match."
            )


def check_attention_masks(prompt_attention_mask, prompt_embeds, negative_prompt_attention_mask,
                          negative_prompt_embeds) -> None:
    """A token mask [B, L] of its (precomputed) embeddings."""
    for name, mask, embeds in (
        ("prompt_attention_mask", prompt_attention_mask, prompt_embeds),
        ("negative_prompt_attention_mask", negative_prompt_attention_mask, negative_prompt_embeds),
    ):
        if mask is not None and (embeds is None or tuple(mask.shape) != tuple(embeds.shape[:2])):
            expected = "[B, L] of its embeddings" if embeds is None else list(embeds.shape[:2])
            raise InputError(f"`{name}` has shape {tuple(mask.shape)}; expected {expected}.")


def batch_size(prompt, prompt_embeds) -> int:
    """The prompts of a call: `prompt`'s, else the rows of `prompt_embeds`."""
    return len(prompt) if isinstance(prompt, list) else 1 if prompt is not None else _rows(prompt_embeds)


def check_latents_shape(latents, layouts: dict[str, tuple]) -> None:
    """`latents` in one of `layouts` (a description, "" for the sampler's own, -> its shape)."""
    if latents is not None and tuple(latents.shape) not in [tuple(shape) for shape in layouts.values()]:
        expected = ", or ".join(f"{name}{list(shape)}" for name, shape in layouts.items())
        raise InputError(f"`latents` has shape {tuple(latents.shape)}; expected {expected}.")


# ----------------------------------------------------------------------------------------------------------
# Words the tokenizers do not know
# ----------------------------------------------------------------------------------------------------------
_LETTER_RUN = re.compile(r"[^\W\d_]+")


def unknown_words(tokenizer, prompts: list[str]) -> list[str]:
    """The words (runs of letters) of `prompts` that `tokenizer` does not know: it maps them (in part) to its unknown
    token, or spells them character by character (every token a single character, word-end and word-start marks
    aside). For the word-level vocabularies of small tokenizers this is every word outside the vocabulary; real
    CLIP and T5 tokenizers split rare words into known pieces and rarely spell one out."""
    words = list(dict.fromkeys(w for prompt in prompts for w in _LETTER_RUN.findall(prompt)))
    if not words:
        return []
    unk = tokenizer.unk_token_id
    found = []
    for word, ids in zip(words, tokenizer(words, add_special_tokens=False).input_ids):
        pieces = [token.replace("</w>", "").lstrip("\u2581") for token in tokenizer.convert_ids_to_tokens(ids)]
        spelled = len(word) > 1 and all(len(piece) <= 1 for piece in pieces)
        if (unk is not None and unk in ids) or spelled:
            found.append(word)
    return found


def warn_unknown_words(pipe, prompts: dict[str, object]) -> None:
    """Log one warning per tokenizer of `pipe` that does not know words of the prompts it reads."""
    for encoder_name, tokenizer_name in TEXT_ENCODERS.items():
        tokenizer, text = getattr(pipe, tokenizer_name, None), prompts.get(encoder_name)
        if tokenizer is None or getattr(pipe, encoder_name, None) is None or text is None:
            continue
        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            continue  # the prompt checks name the problem
        words = unknown_words(tokenizer, texts)
        if words:
            shown = ", ".join(map(repr, words[:10])) + (", ..." if len(words) > 10 else "")
            logger.warning(f"`{tokenizer_name}` does not know {len(words)} word(s) of the prompt: {shown}. It spells "
                           "them letter by letter (or as its unknown token), so the model most likely ignores them.")


# ----------------------------------------------------------------------------------------------------------
# Memory known up front
# ----------------------------------------------------------------------------------------------------------
def memory_needed(pipe, images: int, height: int, width: int, steps: int, guidance_scale: float,
                  output_type: str) -> dict[str, tuple[int, str]]:
    """A lower bound of the memory a call holds at once, by cause: name -> (bytes, the arguments it grows with).

    The sampler's per-step objects; the latents (noise, model input, velocity and the next latents; twice the
    rows with guidance); the text conditioning (at least the CLIP tokens); the decoded images (the VAE's output
    and its first decoder block at full size, the float and 8-bit copies of `output_type`)."""
    transformer, vae = pipe.transformer, pipe.vae
    itemsize = torch.finfo(transformer.dtype).bits // 8 if transformer.dtype.is_floating_point else 4
    rows = images * (2 if guidance_scale > 1 else 1)
    factor = pipe.vae_scale_factor
    latent = transformer.in_channels * (height // factor) * (width // factor) * itemsize
    # CLIP's sequence tokens, at least: SD3's 77 where it has a CLIP, none in FLUX.1's layout (CLIP gives the pooled)
    prefix = getattr(pipe, "_text_prefix_length", None)
    clip_tokens = prefix() if prefix is not None else \
        pipe.tokenizer_max_length if getattr(pipe, "text_encoder", None) is not None else 0
    tokens = max(1, clip_tokens)
    pixels = images * height * width
    needed = {
        "the sampler's steps": (steps * BYTES_PER_STEP, f"num_inference_steps={steps}"),
        "the latents": ((images * 2 + rows * 2) * latent, f"{images} image(s) x {height} x {width} px"),
        "the text conditioning": (rows * tokens * transformer.config.txt_dim * itemsize, f"{images} image(s)"),
    }
    if output_type != "latent" and vae is not None:
        first_block = (getattr(vae.config, "block_out_channels", None) or [3])[0]
        decoded = pixels * (3 * 4 + 2 * first_block * 4 + (3 * 4 + 3 if output_type == "pil" else 0))
        needed["the decoded images"] = (decoded, f"{images} image(s) x {height} x {width} px")
    return needed


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated: on a CUDA device the free and the cached memory, else the host's
    available memory (Linux `MemAvailable`, or free pages); None where it cannot be known."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def check_memory(pipe, images: int, height: int, width: int, steps: int, guidance_scale: float,
                 output_type: str) -> None:
    """Refuse a call whose `memory_needed` exceeds `available_memory`; the sampler's steps count against the host,
    the rest against the execution device."""
    needed = memory_needed(pipe, images, height, width, steps, guidance_scale, output_type)
    device = pipe._execution_device
    budgets = {"host": [0, available_memory(torch.device("cpu"))], "device": [0, available_memory(device)]}
    for name, (size, _) in needed.items():
        budgets["host" if name == "the sampler's steps" or device.type == "cpu" else "device"][0] += size
    for place, (size, available) in budgets.items():
        if available is not None and size > available:
            name, (largest, arguments) = max(((n, v) for n, v in needed.items()), key=lambda item: item[1][0])
            where = "memory" if device.type == "cpu" else f"{place} memory"
            raise InputError(
                f"This call needs at least {size / GIB:.1f} GiB of {where}, more than the {available / GIB:.1f} GiB "
                f"available; {name} alone take {largest / GIB:.1f} GiB ({arguments}). Ask for fewer steps, images or "
                "pixels."
            )
