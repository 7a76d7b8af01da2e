"""Captions -> the transformer's text inputs during training, with per-encoder caption dropout and caching.

Caption dropout (`--caption_dropout_prob p`): for every example each text encoder independently sees the empty
caption "" with probability p (SD3 drops its three encoders independently); `--caption_dropout_all_prob q` drops
all of them together with probability q. Dropping all of them gives exactly the pipeline's unconditional input
(the encoding of the negative prompt ""), the prediction classifier-free guidance extrapolates from; dropping some
teaches the model to use whichever encoders are left.

The conditioning is computed by the pipeline's own text encoding (`pipelines.text_encoding`: `encode_each`, then
`join`), so training and generation cannot disagree:

- without a cache, each encoder encodes the batch's captions with "" in its dropped places;
- with `--cache_text_embeddings`, each distinct caption is encoded once per encoder (`encode_each`) into a disk
  cache (`cache`; reused by later runs with the same encoders and captions), and "" once; every step swaps each
  example's dropped encoders for the empty caption's outputs (`drop_captions`) and joins them (`join`). The text
  encoders are freed after caching.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from ..pipelines.text_encoding import (
    EncoderOutput,
    drop_captions,
    encode_each,
    join,
    join_settings,
    text_encoder_names,
    text_layout,
    uses_text_mask,
)
from .cache import ExampleRows, build_or_reuse, text_key

FIELDS = ("hidden", "mask", "pooled")


class PromptEncoder:
    """The text conditioning of training batches for `pipe` (an `MMDiTPipeline`)."""

    def __init__(self, pipe, max_sequence_length: int | None, device):
        self.pipe = pipe
        self.max_sequence_length = max_sequence_length
        self.device = device
        self.encoders = text_encoder_names(pipe)
        if not self.encoders:
            raise InputError("the pipeline has no text encoder; training needs one.")
        self.num_encoders = len(self.encoders)
        self.cached = False
        self._empty: dict[str, EncoderOutput] | None = None
        self._join_settings = None

    # ---------------------------------------------------------------------------------------------------------
    def _resolved_length(self) -> int:
        """`max_sequence_length` as the pipeline uses it (it picks one when None, and checks it)."""
        try:
            return self.pipe._resolve_max_sequence_length(self.max_sequence_length)
        except ValueError as e:
            raise InputError(f"--max_sequence_length: {e}") from None

    def resolve_length(self) -> None:
        """Fix `max_sequence_length` to the number the pipeline uses, against its transformer."""
        self.max_sequence_length = self._resolved_length()

    def prepare(self, device, dtype) -> None:
        self.device = device
        for name in self.encoders:
            module = getattr(self.pipe, name)
            module.requires_grad_(False)
            module.eval()
            if next(module.parameters()).dtype != dtype:
                module.to(dtype=dtype)
            module.to(device)

    def free(self) -> None:
        """Drop the text encoders (after caching): the pipeline can then only take precomputed embeddings."""
        for name in self.encoders:
            setattr(self.pipe, name, None)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ---------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _encode_each(self, prompts: dict[str, list[str]], length: int | None = None) -> dict[str, EncoderOutput]:
        try:
            return encode_each(self.pipe, prompts, self.max_sequence_length if length is None else length, self.device)
        except ValueError as e:
            raise InputError(f"cannot encode captions: {e}") from None

    def _join(self, outputs: dict[str, EncoderOutput], length: int | None = None):
        try:
            settings = self._join_settings or join_settings(self.pipe)
            return join(outputs, self.max_sequence_length if length is None else length, *settings)
        except ValueError as e:
            raise InputError(f"cannot encode captions: {e}") from None

    def probe_shape(self, caption: str) -> tuple[int, int, int]:
        """(sequence length, txt_dim, pooled width) of an encoded caption (also checks --max_sequence_length)."""
        length = self._resolved_length()
        cond = self._join(self._encode_each({name: [caption] for name in self.encoders}, length), length)
        return cond.embeds.shape[1], cond.embeds.shape[2], cond.pooled.shape[1]

    def encode(self, captions: list[str], drop: torch.Tensor | None = None):
        """Encode a batch; `drop[b, k]` replaces example b's caption by "" for encoder k."""
        prompts = {
            name: [("" if drop is not None and bool(drop[b, k]) else c) for b, c in enumerate(captions)]
            for k, name in enumerate(self.encoders)
        }
        return self._join(self._encode_each(prompts))

    def from_batch(self, batch: dict, drop: torch.Tensor | None):
        if self.cached:
            return self._join_cached(batch, drop)
        return self.encode(batch["caption"], drop)

    def pipeline_kwargs(self, prompts: list[str]) -> list[dict]:
        """Precomputed pipeline arguments (prompt and "" negative) per prompt, for validation after `free()`: the
        conditioning of the pipeline's `encode_prompt` (one pass of each encoder over the prompt and "")."""
        out = []
        for prompt in prompts:
            with torch.no_grad():
                positive, negative = self._join(self._encode_each({name: [prompt, ""] for name in self.encoders})).split(1)
            out.append({"prompt_embeds": positive.embeds, "negative_prompt_embeds": negative.embeds,
                        "pooled_prompt_embeds": positive.pooled, "negative_pooled_prompt_embeds": negative.pooled,
                        "prompt_attention_mask": positive.mask, "negative_prompt_attention_mask": negative.mask})
        return out

    # ---------------------------------------------------------------------------------------------------------
    # Cache: each encoder's outputs, as dataset tensors `text.<encoder>.<field>`
    # ---------------------------------------------------------------------------------------------------------
    def _join_cached(self, batch: dict, drop: torch.Tensor | None):
        outputs = {
            name: EncoderOutput(**{field: batch[f"text.{name}.{field}"].to(self.device)
                                   for field in FIELDS if f"text.{name}.{field}" in batch})
            for name in self.encoders
        }
        if drop is not None:
            outputs = drop_captions(outputs, self._empty, drop)
        return self._join(outputs)

    def build_cache(self, captions: list[str], accelerator, root: str, batch_size: int = 16) -> ExampleRows:
        """Encode each distinct caption once into the disk cache under `root` (`cache.build_or_reuse`: each process
        encodes a slice of the distinct captions, or an earlier run's cache is reused); returns example i's `text.*`
        tensors at `[i]`, for the dataset."""
        self._join_settings = join_settings(self.pipe)  # read now: `free()` drops the text encoders
        self._empty = self._encode_each({name: [""] for name in self.encoders})

        distinct = list(dict.fromkeys(captions))
        key = text_key(self.pipe, self.encoders, dict(text_layout(self.pipe).encoders), self.max_sequence_length,
                       not uses_text_mask(self.pipe), distinct)

        def encode(rows: list[int]):
            for lo in range(0, len(rows), batch_size):
                idx = rows[lo: lo + batch_size]
                outputs = self._encode_each({name: [distinct[i] for i in idx] for name in self.encoders})
                tensors = {f"text.{name}.{field}": getattr(out, field) for name, out in outputs.items()
                           for field in FIELDS if getattr(out, field) is not None}
                for j, i in enumerate(idx):
                    yield i, {name: value[j] for name, value in tensors.items()}

        rows = build_or_reuse(root, key, len(distinct), encode, accelerator,
                              f"text embeddings of {len(distinct)} distinct captions")
        self.cached = True
        row_of = {caption: i for i, caption in enumerate(distinct)}
        return ExampleRows(rows, [row_of[caption] for caption in captions])
