"""Prompt -> MMDiT text conditioning, in SD3's layout or FLUX.1's (`TextLayout`).

SD3: the text sequence is the CLIP hidden states (one or two CLIP text encoders, their penultimate layer concatenated
on channels and zero-padded to the T5 width, or cut to it where wider, as SD3) followed by the T5 hidden states; the
pooled vector is the CLIP projected pooled outputs concatenated. Without T5 the T5 part is zeros, as diffusers'
`StableDiffusion3Pipeline`. FLUX.1: the text sequence is T5's alone and the pooled vector CLIP's pooled output, as
diffusers' `FluxPipeline`. A pipeline names its layout in `text_layout` (SD3's when it has none).

Alongside, a token mask in the same layout: 1 for real tokens, 0 for padding (and for the zeros that stand in for a
missing T5). Models trained with padding masked out (`use_text_attention_mask`) receive it; SD3 weights do not.

The one implementation, in two steps that both `MMDiTPipeline` and training use:

    outputs = encode_each(pipe, prompts, max_sequence_length, device)    # each text encoder on its own prompts
    conditioning = join(outputs, max_sequence_length, *join_settings(pipe))  # SD3's layout

`encode_text` is the two together (the pipeline's `encode_prompt`). Training's caption dropout gives each encoder its
own prompts ("" where dropped), or, with cached outputs, swaps rows for the empty caption's (`drop_captions`) before
the same `join`: cached and uncached conditioning are the same numbers by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.utils import logging

logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class TextLayout:
    """Which text encoder of a pipeline does what. `encoders`: text encoder -> its tokenizer, CLIPs first, then T5;
    `t5`: the T5 encoder's name; `clip_in_sequence`: the CLIP hidden states open the text sequence (SD3), or CLIP
    gives the pooled vector only (FLUX.1)."""

    encoders: tuple[tuple[str, str], ...]
    t5: str
    clip_in_sequence: bool


SD3_TEXT = TextLayout(
    (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"), ("text_encoder_3", "tokenizer_3")),
    t5="text_encoder_3",
    clip_in_sequence=True,
)
FLUX_TEXT = TextLayout((("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")), t5="text_encoder_2",
                       clip_in_sequence=False)

# SD3's text encoder -> tokenizer (pipelines of either layout pair `text_encoder_<k>` with `tokenizer_<k>`)
TEXT_ENCODERS = dict(SD3_TEXT.encoders)


def text_layout(pipe) -> TextLayout:
    return getattr(pipe, "text_layout", SD3_TEXT)


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
    """CLIP's penultimate hidden states (or `clip_skip` layers further back), pooled output (projected by a
    `CLIPTextModelWithProjection`, as SD3; a `CLIPTextModel`'s `pooler_output`, as FLUX.1), token mask."""
    ids, mask = tokenize(tokenizer, prompts, max_length, name)
    output = text_encoder(ids.to(device), output_hidden_states=True)
    hidden = output.hidden_states[-((clip_skip or 0) + 2)]
    pooled = output.text_embeds if "text_embeds" in output else output.pooler_output
    return hidden, pooled, mask.to(device)


def encode_t5(tokenizer, text_encoder, prompts, max_length, device, attend_to_padding=True, name="tokenizer_3"):
    """T5's last hidden states and token mask. SD3 runs T5 over the padding unmasked (`attend_to_padding=True`);
    masked models mask it, so a prompt's embedding does not depend on how far it is padded."""
    ids, mask = tokenize(tokenizer, prompts, max_length, name)
    mask = mask.to(device)
    hidden = text_encoder(ids.to(device), attention_mask=None if attend_to_padding else mask)[0]
    return hidden.to(dtype=text_encoder.dtype), mask


def join_clip_and_t5(
    clip_parts: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    t5_part: tuple[torch.Tensor, torch.Tensor] | None,
    t5_length: int,
    txt_dim: int,
    dtype: torch.dtype,
) -> TextConditioning:
    """SD3's layout from the encoder outputs (`clip_parts`: encoder name -> (hidden, pooled, mask), in sequence
    order); `t5_part=None` puts `t5_length` masked zero tokens in its place.

    The CLIP states are zero-padded to the T5 width (`txt_dim` without T5); CLIP states wider than that are cut to
    it, as `StableDiffusion3Pipeline` does (diffusers' own tiny test components are laid out that way), with a
    warning that says what was cut."""
    clip_embeds = torch.cat([hidden for hidden, _, _ in clip_parts.values()], dim=-1).to(dtype)
    pooled = torch.cat([pooled for _, pooled, _ in clip_parts.values()], dim=-1)
    clip_mask = torch.stack([mask for _, _, mask in clip_parts.values()]).amax(dim=0)  # real in any CLIP -> real
    batch, device = clip_embeds.shape[0], clip_embeds.device

    if t5_part is None:
        t5_embeds = torch.zeros(batch, t5_length, txt_dim, device=device, dtype=dtype)
        t5_mask = torch.zeros(batch, t5_length, device=device, dtype=clip_mask.dtype)
    else:
        t5_embeds, t5_mask = t5_part
    width = t5_embeds.shape[-1]
    if clip_embeds.shape[-1] > width:
        _warn_clip_cut({name: hidden.shape[-1] for name, (hidden, _, _) in clip_parts.items()}, width)
    # F.pad with a negative amount cuts, as SD3's `encode_prompt`
    clip_embeds = F.pad(clip_embeds, (0, width - clip_embeds.shape[-1]))
    return TextConditioning(
        embeds=torch.cat([clip_embeds, t5_embeds], dim=-2),
        pooled=pooled,
        mask=torch.cat([clip_mask, t5_mask.to(clip_mask.dtype)], dim=-1).long(),
    )


_WARNED_CLIP_CUTS: set[tuple] = set()


def _warn_clip_cut(widths: dict[str, int], width: int) -> None:
    """Say once per layout which CLIP channels do not fit the text width and are cut."""
    key = (tuple(widths.items()), width)
    if key in _WARNED_CLIP_CUTS:
        return
    _WARNED_CLIP_CUTS.add(key)
    cut, start = [], 0
    for name, channels in widths.items():
        lo, hi = max(start, width), start + channels
        if hi > lo:
            cut.append(f"all {channels} channels of `{name}`" if lo == start
                       else f"channels {lo - start}..{channels - 1} of `{name}`")
        start = hi
    logger.warning(
        f"The CLIP hidden states are {start} channels wide together ({', '.join(f'{n}: {c}' for n, c in widths.items())}), "
        f"wider than the text sequence's {width} (T5 width / transformer `txt_dim`): {'; '.join(cut)} are cut from "
        "the text sequence, as StableDiffusion3Pipeline does. The pooled text vector keeps every CLIP's output."
    )


@dataclass
class EncoderOutput:
    """One text encoder's output for a batch: `hidden` [B, L, D], `mask` [B, L] and, for a CLIP, `pooled` [B, P]."""

    hidden: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor | None = None

    def where(self, rows: torch.Tensor, other: "EncoderOutput") -> "EncoderOutput":
        """`other`'s values in the rows where `rows` [B] is True (`other` may hold a single row, broadcast)."""

        def pick(mine, theirs):
            if mine is None:
                return None
            select = rows.to(mine.device).reshape(-1, *([1] * (mine.ndim - 1)))
            return torch.where(select, theirs.to(mine.device).expand_as(mine), mine)

        return EncoderOutput(pick(self.hidden, other.hidden), pick(self.mask, other.mask), pick(self.pooled, other.pooled))


def text_encoder_names(pipe) -> list[str]:
    """The text encoders `pipe` has, in its layout's order."""
    return [name for name, _ in text_layout(pipe).encoders if getattr(pipe, name, None) is not None]


def uses_text_mask(pipe) -> bool:
    """Whether `pipe.transformer` was built to mask text padding (`use_text_attention_mask`)."""
    transformer = getattr(pipe, "transformer", None)
    return bool(transformer is not None and transformer.config.use_text_attention_mask)


def encode_each(pipe, prompts: dict[str, list[str]], max_sequence_length: int, device,
                clip_skip: int | None = None) -> dict[str, EncoderOutput]:
    """Run each text encoder of `pipe` on its prompts (`prompts[name]` for encoder `name`, equally many).

    CLIP: penultimate hidden states (or `clip_skip` layers further back), projected pooled output, mask over
    `pipe.tokenizer_max_length` tokens. T5: last hidden states over `max_sequence_length` tokens, run over the padding
    unmasked as SD3 and FLUX.1 unless the transformer masks text padding."""
    layout = text_layout(pipe)
    tokenizers = dict(layout.encoders)
    outputs = {}
    for name in text_encoder_names(pipe):
        tokenizer_name = tokenizers[name]
        tokenizer, encoder = getattr(pipe, tokenizer_name), getattr(pipe, name)
        if name == layout.t5:
            hidden, mask = encode_t5(tokenizer, encoder, prompts[name], max_sequence_length, device,
                                     attend_to_padding=not uses_text_mask(pipe), name=tokenizer_name)
            outputs[name] = EncoderOutput(hidden, mask)
        else:
            hidden, pooled, mask = encode_clip(tokenizer, encoder, prompts[name], pipe.tokenizer_max_length, device,
                                               clip_skip, name=tokenizer_name)
            outputs[name] = EncoderOutput(hidden, mask, pooled)
    return outputs


def join_settings(pipe) -> tuple[int | None, torch.dtype, int | None, TextLayout]:
    """`(txt_dim, dtype, pooled_dim, layout)` for `join`: the transformer's text width and pooled-text width (None
    without a transformer: the CLIP widths), the first CLIP's dtype and the pipeline's `TextLayout`. Read them before
    the text encoders are freed."""
    if getattr(pipe, "text_encoder", None) is None:
        raise ValueError("This pipeline has no `text_encoder`: pass `prompt_embeds` and `pooled_prompt_embeds`.")
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        return None, pipe.text_encoder.dtype, None, text_layout(pipe)
    return transformer.config.txt_dim, pipe.text_encoder.dtype, pooled_text_width(transformer), text_layout(pipe)


def pooled_text_width(transformer) -> int:
    """The width of the pooled text vector `transformer` takes (`cond_dim`, which defaults to `hidden_size`)."""
    return transformer.resolved_config["cond_dim"]


def needs_second_clip(pipe) -> bool:
    """Whether `pipe.transformer` takes pooled text wider than the first CLIP's (SD3's layout: both CLIPs' pooled
    outputs concatenated), so that the pipeline cannot run without `text_encoder_2`."""
    transformer, clip = getattr(pipe, "transformer", None), getattr(pipe, "text_encoder", None)
    if transformer is None or clip is None:
        return False
    return pooled_text_width(transformer) > clip.config.projection_dim


def join(outputs: dict[str, EncoderOutput], t5_length: int, txt_dim: int | None, dtype: torch.dtype,
         pooled_dim: int | None = None, layout: TextLayout = SD3_TEXT) -> TextConditioning:
    """The layout's conditioning from `encode_each`'s outputs (SD3: see `join_clip_and_t5`; FLUX.1: T5's states and
    mask, the CLIP pooled output). `pooled_dim`: the width of pooled text the transformer takes (checked against the
    CLIPs' pooled outputs, when given)."""
    clip_parts = {name: (out.hidden, out.pooled, out.mask) for name, out in outputs.items() if name != layout.t5}
    if not clip_parts:
        raise ValueError("This pipeline has no CLIP `text_encoder`: pass `prompt_embeds` and `pooled_prompt_embeds`.")
    pooled_width = sum(pooled.shape[-1] for _, pooled, _ in clip_parts.values())
    if pooled_dim is not None and pooled_width != pooled_dim:
        missing = " (an SD3-layout transformer needs `text_encoder_2` too)" if len(clip_parts) == 1 else ""
        raise ValueError(
            f"The CLIP pooled outputs ({', '.join(clip_parts)}) are {pooled_width} wide together, but the transformer "
            f"takes pooled text of width {pooled_dim}{missing if layout.clip_in_sequence else ''}."
        )
    t5 = outputs.get(layout.t5)
    if not layout.clip_in_sequence:
        if t5 is None:
            raise ValueError(f"This pipeline has no T5 `{layout.t5}`: pass `prompt_embeds` and `pooled_prompt_embeds`.")
        return TextConditioning(t5.hidden, next(iter(clip_parts.values()))[1], t5.mask.long())
    t5_part = None if t5 is None else (t5.hidden, t5.mask)
    txt_dim = next(iter(clip_parts.values()))[0].shape[-1] if txt_dim is None else txt_dim
    return join_clip_and_t5(clip_parts, t5_part, t5_length, txt_dim, dtype)


def drop_captions(outputs: dict[str, EncoderOutput], empty: dict[str, EncoderOutput],
                  drop: torch.Tensor) -> dict[str, EncoderOutput]:
    """Caption dropout on encoded prompts: encoder k's row b becomes `empty`'s (the encoding of "") where
    `drop[b, k]`; k counts the encoders of `outputs` in order."""
    return {name: out.where(drop[:, k], empty[name]) for k, (name, out) in enumerate(outputs.items())}


def encode_text(pipe, prompts: dict[str, list[str]], max_sequence_length: int, device,
                clip_skip: int | None = None) -> TextConditioning:
    """Prompts (one list per text encoder, keyed by the encoders' names) -> `pipe`'s text conditioning."""
    settings = join_settings(pipe)
    return join(encode_each(pipe, prompts, max_sequence_length, device, clip_skip), max_sequence_length, *settings)
