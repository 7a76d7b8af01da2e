"""Captions -> the transformer's text inputs during training, with per-encoder caption dropout and caching.

Caption dropout (`--caption_dropout_prob p`): for every example each text encoder independently sees the empty
caption "" with probability p (SD3 drops its three encoders independently). Dropping all of them gives exactly
the pipeline's unconditional input (the encoding of the negative prompt ""), so classifier-free guidance
works; dropping some teaches the model to use whichever encoders are left.

Without a cache a batch is encoded by `pipe.encode_prompt(prompt, prompt_2, prompt_3, ...)` with "" in the
dropped places (prompt -> text_encoder, prompt_2 -> text_encoder_2, prompt_3 -> text_encoder_3 (T5)).

With `--cache_text_embeddings` each caption is encoded once *per encoder* (CLIP: penultimate hidden states,
pooled output and token mask; T5: hidden states and mask), together with the parts of "" once; every step
chooses each example's parts (its own or the empty caption's) and joins them in the pipeline's layout with
`pipelines.text_encoding.join_clip_and_t5`. At start the join is checked against `pipe.encode_prompt` for a
caption under every dropout pattern, so cached and uncached conditioning are the same numbers. After caching
the text encoders are freed.
"""

from __future__ import annotations

import itertools

import torch

from .errors import TrainingConfigError

_ENCODERS = (("text_encoder", "tokenizer", "prompt"), ("text_encoder_2", "tokenizer_2", "prompt_2"),
             ("text_encoder_3", "tokenizer_3", "prompt_3"))


class PromptEncoder:
    def __init__(self, pipe, max_sequence_length: int, device):
        self.pipe = pipe
        self.max_sequence_length = max_sequence_length
        self.device = device
        self.use_mask = True
        self.encoders = [(enc, tok, kw) for enc, tok, kw in _ENCODERS if getattr(pipe, enc, None) is not None]
        if not self.encoders:
            raise TrainingConfigError("the pipeline has no text encoder; training needs one.")
        self.num_encoders = len(self.encoders)
        self.cached = False
        self._empty_parts = None
        self._txt_dim = None
        self._dtype = None

    # ---------------------------------------------------------------------------------------------------------
    def resolve_length(self) -> None:
        """Fix `max_sequence_length` to the number the pipeline uses (it picks one when None)."""
        resolve = getattr(self.pipe, "_resolve_max_sequence_length", None)
        if resolve is not None:
            try:
                self.max_sequence_length = resolve(self.max_sequence_length)
            except ValueError as e:
                raise TrainingConfigError(f"--max_sequence_length: {e}") from None

    def prepare(self, device, dtype) -> None:
        self.device = device
        for enc, _, _ in self.encoders:
            module = getattr(self.pipe, enc)
            module.requires_grad_(False)
            module.eval()
            if next(module.parameters()).dtype != dtype:
                module.to(dtype=dtype)
            module.to(device)

    def free(self) -> None:
        """Drop the text encoders (after caching): the pipeline can then only take precomputed embeddings."""
        for enc, _, _ in self.encoders:
            setattr(self.pipe, enc, None)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ---------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _encode_prompt(self, prompts: dict[str, list[str]]):
        try:
            out = self.pipe.encode_prompt(
                device=self.device, do_classifier_free_guidance=False, return_attention_mask=True,
                max_sequence_length=self.max_sequence_length, **prompts,
            )
        except ValueError as e:
            raise TrainingConfigError(f"cannot encode captions: {e}") from None
        from ..pipelines.text_encoding import TextConditioning

        embeds, _, pooled, _, mask, _ = out
        return TextConditioning(embeds, pooled, mask)

    def probe_shape(self, caption: str) -> tuple[int, int, int]:
        """(sequence length, txt_dim, pooled width) of an encoded caption (also checks --max_sequence_length)."""
        cond = self._encode_prompt({"prompt": [caption]})
        return cond.embeds.shape[1], cond.embeds.shape[2], cond.pooled.shape[1]

    def encode(self, captions: list[str], drop: torch.Tensor | None = None):
        """Encode a batch; `drop[b, k]` replaces example b's caption by "" for encoder k."""
        prompts = {}
        for k, (_, _, kw) in enumerate(self.encoders):
            prompts[kw] = [("" if drop is not None and bool(drop[b, k]) else c) for b, c in enumerate(captions)]
        return self._encode_prompt(prompts)

    def from_batch(self, batch: dict, drop: torch.Tensor | None):
        if self.cached:
            return self._join_cached(batch, drop)
        return self.encode(batch["caption"], drop)

    def pipeline_kwargs(self, prompts: list[str]) -> list[dict]:
        """Precomputed pipeline arguments (prompt and "" negative) per prompt, for validation after `free()`."""
        out = []
        for prompt in prompts:
            with torch.no_grad():
                embeds, neg, pooled, neg_pooled, mask, neg_mask = self.pipe.encode_prompt(
                    prompt=[prompt], device=self.device, do_classifier_free_guidance=True, return_attention_mask=True,
                    max_sequence_length=self.max_sequence_length)
            out.append({"prompt_embeds": embeds, "negative_prompt_embeds": neg, "pooled_prompt_embeds": pooled,
                        "negative_pooled_prompt_embeds": neg_pooled, "prompt_attention_mask": mask,
                        "negative_prompt_attention_mask": neg_mask})
        return out

    # ---------------------------------------------------------------------------------------------------------
    # Cache: per-encoder parts
    # ---------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _parts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Per-encoder outputs, as the pipeline computes them: `clipK.hidden/.pooled/.mask`, `t5.hidden/.mask`."""
        from ..pipelines.text_encoding import encode_clip, encode_t5

        pipe, parts = self.pipe, {}
        for k, (enc, tok, _) in enumerate(self.encoders):
            if enc == "text_encoder_3":
                hidden, mask = encode_t5(getattr(pipe, tok), getattr(pipe, enc), captions, self.max_sequence_length,
                                         self.device, attend_to_padding=not self.use_mask, name=tok)
                parts["t5.hidden"], parts["t5.mask"] = hidden, mask
            else:
                hidden, pooled, mask = encode_clip(getattr(pipe, tok), getattr(pipe, enc), captions,
                                                   pipe.tokenizer_max_length, self.device, None, name=tok)
                parts[f"clip{k}.hidden"], parts[f"clip{k}.pooled"], parts[f"clip{k}.mask"] = hidden, pooled, mask
        return parts

    def _join(self, parts: dict[str, torch.Tensor]):
        from ..pipelines.text_encoding import join_clip_and_t5

        clip = [(parts[f"clip{k}.hidden"], parts[f"clip{k}.pooled"], parts[f"clip{k}.mask"])
                for k, (enc, _, _) in enumerate(self.encoders) if enc != "text_encoder_3"]
        t5 = (parts["t5.hidden"], parts["t5.mask"]) if "t5.hidden" in parts else None
        return join_clip_and_t5(clip, t5, self.max_sequence_length, self._txt_dim, self._dtype)

    def _encoder_of(self, key: str) -> int:
        if key.startswith("t5."):
            return [enc for enc, _, _ in self.encoders].index("text_encoder_3")
        return int(key.split(".")[0][len("clip"):])

    def _select(self, parts: dict, empty: dict, drop: torch.Tensor | None) -> dict:
        if drop is None:
            return parts
        out = {}
        for key, value in parts.items():
            d = drop[:, self._encoder_of(key)].to(value.device).reshape(-1, *([1] * (value.ndim - 1)))
            out[key] = torch.where(d, empty[key].to(value.device).expand_as(value), value)
        return out

    def _join_cached(self, batch: dict, drop: torch.Tensor | None):
        parts = {key[len("text."):]: value.to(self.device) for key, value in batch.items() if key.startswith("text.")}
        return self._join(self._select(parts, self._empty_parts, drop))

    def build_cache(self, captions: list[str], accelerator, batch_size: int = 16) -> dict[str, torch.Tensor]:
        """Encode each distinct caption once (each process a share, then exchanged); returns `text.*` tensors
        [N, ...] on CPU for the dataset, row i for captions[i]. Checks the cached join against `encode_prompt` first."""
        from accelerate.utils import gather_object

        self._dtype = self.pipe.text_encoder.dtype
        self._txt_dim = self._encode_prompt({"prompt": [""]}).embeds.shape[-1]
        self._empty_parts = {k: v.cpu() for k, v in self._parts([""]).items()}
        self._check_join(captions[0])

        distinct = list(dict.fromkeys(captions))
        world, rank = accelerator.num_processes, accelerator.process_index
        mine = list(range(rank, len(distinct), world))
        results = []
        for lo in range(0, len(mine), batch_size):
            idx = mine[lo: lo + batch_size]
            parts = self._parts([distinct[i] for i in idx])
            results += [(i, {k: v[j].cpu() for k, v in parts.items()}) for j, i in enumerate(idx)]
        if world > 1:
            results = gather_object(results)
        rows = [None] * len(distinct)
        for i, row in results:
            rows[i] = row
        row_of = {caption: i for i, caption in enumerate(distinct)}
        order = torch.tensor([row_of[caption] for caption in captions])
        self.cached = True
        return {f"text.{key}": torch.stack([row[key] for row in rows])[order] for key in rows[0]}

    def _check_join(self, caption: str) -> None:
        for pattern in itertools.product([False, True], repeat=self.num_encoders):
            drop = torch.tensor([pattern])
            want = self.encode([caption], drop)
            parts = {k: v for k, v in self._parts([caption]).items()}
            got = self._join(self._select(parts, {k: v.to(self.device) for k, v in self._empty_parts.items()}, drop))
            for name in ("embeds", "pooled", "mask"):
                a, b = getattr(want, name), getattr(got, name)
                if a.shape != b.shape or not torch.allclose(a.float(), b.float(), atol=1e-5, rtol=1e-5):
                    raise TrainingConfigError(
                        "--cache_text_embeddings: the cached per-encoder text conditioning does not reproduce this "
                        f"pipeline's encode_prompt ({name}, dropout pattern {pattern}); train without the text cache."
                    )
