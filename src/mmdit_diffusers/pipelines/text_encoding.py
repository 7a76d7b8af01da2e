"""Prompt -> MMDiT text conditioning, in SD3's layout.

The text sequence is the CLIP hidden states (one or two CLIP text encoders, their penultimate layer concatenated on
channels and zero-padded to the T5 width) followed by the T5 hidden states; the pooled vector is the CLIP projected
pooled outputs concatenated. Without T5 the T5 part is zeros, as diffusers' `StableDiffusion3Pipeline`.

Alongside, a token mask in the same layout: 1 for real tokens, 0 for padding (and for the zeros that stand in for a
missing T5). Models trained with padding masked out (`use_text_attention_mask`) receive it; SD3 weights do not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.utils import logging

logger = logging.get_logger(__name__)


@dataclass
class TextConditioning:
    """One batch of prompts, encoded. `embeds` [B, L, D], `pooled` [B, P], `mask` [B, L] long (1 real, 0 padding)."""

    embeds: torch.Tensor
    pooled: torch.Tensor
    mask: torch.Tensor

    def split(self, size: int) -> list["TextConditioning"]:
        """Consecutive batches of `size` prompts."""
        parts = (t.split(size, dim=0) for t in (self.embeds, self.pooled, self.mask))
        return [TextConditioning(*chunk) for chunk in zip(*parts)]

    def repeat(self, n: int) -> "TextConditioning":
        """Each prompt `n` times in a row (prompt 0, prompt 0, ..., prompt 1, ...), as `num_images_per_prompt`."""
        if n == 1:
            return self
        return TextConditioning(*(t.repeat_interleave(n, dim=0) for t in (self.embeds, self.pooled, self.mask)))


def tokenize(tokenizer, prompts: list[str], max_length: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and mask [B, max_length], padded and truncated to `max_length`; warns with the count of dropped tokens."""
    batch = tokenizer(
        prompts,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    )
    _warn_if_truncated(tokenizer, prompts, max_length, name)
    return batch.input_ids, batch.attention_mask


def _warn_if_truncated(tokenizer, prompts: list[str], max_length: int, name: str) -> None:
    full_lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=True, verbose=False).input_ids]
    for i, (prompt, length) in enumerate(zip(prompts, full_lengths)):
        if length > max_length:
            dropped = length - max_length
            preview = prompt if len(prompt) <= 80 else prompt[:77] + "..."
            logger.warning(
                f"Prompt {i} ({preview!r}) is {length} tokens long for `{name}`, which keeps {max_length}: "
                f"{dropped} token{'s' if dropped > 1 else ''} at the end {'were' if dropped > 1 else 'was'} dropped."
            )


def encode_clip(tokenizer, text_encoder, prompts, max_length, device, clip_skip=None, name="tokenizer"):
    """CLIP's penultimate hidden states (or `clip_skip` layers further back), projected pooled output, token mask."""
    ids, mask = tokenize(tokenizer, prompts, max_length, name)
    output = text_encoder(ids.to(device), output_hidden_states=True)
    hidden = output.hidden_states[-((clip_skip or 0) + 2)]
    return hidden, output.text_embeds, mask.to(device)


def encode_t5(tokenizer, text_encoder, prompts, max_length, device, attend_to_padding=True, name="tokenizer_3"):
    """T5's last hidden states and token mask. SD3 runs T5 over the padding unmasked (`attend_to_padding=True`);
    masked models mask it, so a prompt's embedding does not depend on how far it is padded."""
    ids, mask = tokenize(tokenizer, prompts, max_length, name)
    mask = mask.to(device)
    hidden = text_encoder(ids.to(device), attention_mask=None if attend_to_padding else mask)[0]
    return hidden.to(dtype=text_encoder.dtype), mask


def join_clip_and_t5(
    clip_parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    t5_part: tuple[torch.Tensor, torch.Tensor] | None,
    t5_length: int,
    txt_dim: int,
    dtype: torch.dtype,
) -> TextConditioning:
    """SD3's layout from the encoder outputs; `t5_part=None` puts `t5_length` masked zero tokens in its place."""
    clip_embeds = torch.cat([hidden for hidden, _, _ in clip_parts], dim=-1).to(dtype)
    pooled = torch.cat([pooled for _, pooled, _ in clip_parts], dim=-1)
    clip_mask = torch.stack([mask for _, _, mask in clip_parts]).amax(dim=0)  # real in any CLIP -> real
    batch, device = clip_embeds.shape[0], clip_embeds.device

    if t5_part is None:
        t5_embeds = torch.zeros(batch, t5_length, txt_dim, device=device, dtype=dtype)
        t5_mask = torch.zeros(batch, t5_length, device=device, dtype=clip_mask.dtype)
    else:
        t5_embeds, t5_mask = t5_part
    width = t5_embeds.shape[-1]
    if clip_embeds.shape[-1] > width:
        raise ValueError(
            f"The CLIP hidden states are {clip_embeds.shape[-1]} channels wide together, more than the text sequence "
            f"width {width} (T5 width / transformer `txt_dim`); they cannot be zero-padded to it."
        )
    clip_embeds = F.pad(clip_embeds, (0, width - clip_embeds.shape[-1]))
    return TextConditioning(
        embeds=torch.cat([clip_embeds, t5_embeds], dim=-2),
        pooled=pooled,
        mask=torch.cat([clip_mask, t5_mask.to(clip_mask.dtype)], dim=-1).long(),
    )
