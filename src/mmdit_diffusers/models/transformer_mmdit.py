"""MMDiTTransformer2DModel: the Multimodal Diffusion Transformer (Esser et al. 2024, arXiv 2403.03206).

Its sibling modules, bottom up: `attention` (the diffusers attention module with SD3's names and its processor,
joint attention over both streams through diffusers' attention dispatch), `embeddings` (patches, positions, the
conditioning vector), `rope` (FLUX's rotary positions over token ids), `blocks` (named AdaLN modulation, the `Stream`
(modulation and MLP) used for image and text, the double-stream `MMDiTBlock`), `single_stream` (FLUX's single-stream
block), `presets` (named sizes); under them all `fused_ops` (fused inference paths on CPUs with bfloat16 units,
the bfloat16 attention backward on CPUs with AMX).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin
from diffusers.models.model_loading_utils import load_state_dict
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import USE_PEFT_BACKEND, scale_lora_layers, unscale_lora_layers

from ..conversion.flux import (
    flux_config_to_mmdit,
    flux_state_dict_to_mmdit,
    mmdit_config_to_flux,
    mmdit_state_dict_to_flux,
)
from ..conversion.legacy import is_legacy_layout, legacy_state_dict_to_current
from ..conversion.sd3 import mmdit_config_to_sd3, mmdit_state_dict_to_sd3, sd3_config_to_mmdit, sd3_state_dict_to_mmdit
from ..errors import InputError
from .attention import MMDiTAttnProcessor
from .blocks import AdaLNModulation, MMDiTBlock, layer_norm
from .clean_image_cache import CleanImageCacheMixin
from .embeddings import (
    TIMESTEP_CHANNELS,
    MLPEmbedder,
    SinCosPositionEmbedding,
    patchify,
    sinusoidal_guidance,
    sinusoidal_timestep,
    token_grid,
    unpatchify,
)
from .hooks import register_with_diffusers_hooks
from .ip_adapter import MMDiTIPAdapterLoadersMixin
from .loading_checks import check_loading_info, check_local_source, check_sd3_source, pretrained_problem
from .presets import PRESETS, RECOMMENDED
from .rope import RotaryPositionEmbedding, image_ids, text_ids
from .single_file import MMDiTSingleFileMixin
from .single_stream import SingleStreamBlock
from .validation import check_config, check_flux_inputs, check_inputs, warn_if_not_finite


class MMDiTTransformer2DModel(
    ModelMixin,
    AttentionMixin,
    CleanImageCacheMixin,
    ConfigMixin,
    PeftAdapterMixin,
    MMDiTIPAdapterLoadersMixin,
    MMDiTSingleFileMixin,
):
    r"""
    The MMDiT: an image stream and a text stream, each with its own weights, joined in every block by one
    attention over both sequences, and conditioned through AdaLN-Zero on
    `vec = timestep_mlp(sinusoidal(t)) + pooled_text_mlp(pooled_text)`. The same class is Stable Diffusion 3 / 3.5
    and, with `num_single_layers`, `pos_embed_type="rope"` and `guidance_embeds`, FLUX.1 (`from_flux` / `to_flux`,
    presets "flux.1-dev" and "flux.1-schnell").

    Parts, in forward order: `x_embedder` + `pos_embed` (image tokens), `context_embedder` (text tokens),
    `timestep_mlp` + `pooled_text_mlp` (`vec`), `transformer_blocks` (`MMDiTBlock`: an `img` and a `txt` `Stream`,
    each modulated by named shift / scale / gate vectors per sub-layer, joined by the joint attention `attn`, a
    diffusers `Attention` with SD3's names; `attn2` in dual-attention blocks), `norm_out` (shift / scale of the final
    norm) and `proj_out`; FLUX-style configs add `guidance_mlp` (to `vec`) and `single_transformer_blocks`
    (`SingleStreamBlock`, after the double-stream ones), and rotate queries and keys by `pos_embed`
    (`RotaryPositionEmbedding`) instead of adding positions to the image tokens. Plain `nn.Linear` layers; attention
    through processors (`attn_processors`, `set_attn_processor`) and diffusers' attention dispatch
    (`set_attention_backend`); `mmdit_diffusers.cpu_bf16.use_fp32_kernels_for_bf16` changes the kernels from outside
    for bfloat16 on CPUs without bfloat16 instructions. diffusers' cache hooks (`enable_cache`, which also takes
    our `CleanImageCacheConfig`), `compile_repeated_blocks()` and `enable_layerwise_casting()` work as for SD3 and
    FLUX. `from_sd3` / `to_sd3` and `from_flux` / `to_flux` convert diffusers' SD3 and FLUX transformers through
    `mmdit_diffusers.conversion.sd3` and `.flux`; checkpoints of the first layout load through
    `mmdit_diffusers.conversion.legacy`.

    Parameters:
        img_dim (`int`): Feature size of one image token, a patch of the latent: `in_channels * patch_size**2`.
        txt_dim (`int`): Feature size of one text token (e.g. 4096 for SD3's CLIP+T5 sequence).
        img_tokens (`int`, defaults to 64): Image tokens of the token-level forward. They are read row-major on
            the most square patch grid with rows <= cols (`token_grid`: 64 -> 8 x 8, 128 -> 8 x 16). With
            `pos_embed_type="rope"` and `img_ids` given, tokens may come in any number.
        txt_tokens (`int`, defaults to 32): The longest text sequence the model accepts.
        hidden_size (`int`, defaults to 768): Width of both streams.
        depth (`int`, defaults to 12): Number of double-stream blocks.
        num_single_layers (`int`, defaults to 0): Single-stream blocks after the double-stream ones (FLUX.1: 38
            after 19): text and image tokens as one sequence, one modulation (shift / scale / gate), Q, K, V and the
            MLP input from one normed input, attention and MLP in parallel, one output projection. Needs
            `txt_pre_only_last_block=False` (they read the last double-stream block's text).
        num_heads (`int`, defaults to 12): Attention heads; must divide `hidden_size`.
        mlp_ratio (`float`, defaults to 4): MLP hidden width as a multiple of `hidden_size`.
        cond_dim (`int`, *optional*): Size of the pooled text vector; defaults to `hidden_size`.
        patch_size (`int`, defaults to 2): Side of the square latent patch that one image token covers.
        in_channels (`int`, *optional*): Latent channels; defaults to `img_dim // patch_size**2`.
        out_channels (`int`, *optional*): Predicted latent channels; defaults to `in_channels`.
        sample_size (`int`, *optional*): Latent side the sin-cos positions are scaled for (SD3's `sample_size`), and
            the default latent side of pipelines; defaults to the longer side of the `img_tokens` grid times
            `patch_size`.
        pos_embed_max_size (`int`, *optional*): Side of the patch grid of positions; inputs are centre-cropped
            from it, so latents may be at most `pos_embed_max_size * patch_size` high and wide. Defaults to the
            longer side of the `img_tokens` grid. With `"rope"`: the largest patch grid side accepted (None: any).
        pos_embed_type (`str`, defaults to `"sincos"`): The position embedding: `"sincos"`, SD3's 2D table added to
            the image tokens, or `"rope"`, FLUX's rotary embedding of queries and keys by token ids (forward inputs
            `img_ids` and `txt_ids`, FLUX's defaults when omitted).
        axes_dims_rope (`tuple[int]`, defaults to `(16, 56, 56)`): With `"rope"`: the head features each id axis
            rotates (even numbers summing to `hidden_size // num_heads`), as FLUX's `axes_dims_rope`.
        rope_theta (`float`, defaults to 10000): With `"rope"`: the base of the rotation frequencies (FLUX: 10000).
        guidance_embeds (`bool`, defaults to `False`): A guidance embedding (FLUX.1 [dev]'s distilled guidance): the
            forward input `guidance`, a guidance scale per sample, is embedded like a timestep (of `1000 * guidance`)
            by `guidance_mlp` and added to `vec`.
        qk_norm (`str`, *optional*): `None`, `"rms_norm"` or `"layer_norm"` on each head's queries and keys, both streams.
        txt_pre_only_last_block (`bool`, defaults to `True`): Drop the text stream's output path in the last block:
            its result is never used, so those weights would get no gradient (DDP needs every parameter used). As
            SD3 (`context_pre_only`).
        dual_attention_layers (`tuple[int]`, defaults to `()`): Blocks with an extra image-only self-attention (SD3.5 Medium).
        use_text_attention_mask (`bool`, defaults to `True`): Whether the model was trained with padded text tokens
            masked out; pipelines pass the mask only then. SD3 and FLUX weights were trained attending to padding:
            `from_sd3` / `from_flux` set False, so pipelines run them exactly as diffusers does.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["MMDiTBlock", "SingleStreamBlock"]  # as SD3's ["JointTransformerBlock"], FLUX's two
    _repeated_blocks = ["MMDiTBlock", "SingleStreamBlock"]  # compile_repeated_blocks(): one compilation per kind
    # Layerwise casting (e.g. float8 storage) leaves these in the compute dtype, the layers SD3 leaves: the patch
    # embedding (SD3's pos_embed.proj, our x_embedder), the AdaLN modulations (SD3's norm1*, our *.modulation; a
    # single-stream block's `norm`, as FLUX's), the final norm and the QK-norms. No module is kept in float32 on
    # load (`_keep_in_fp32_modules`), as SD3.
    _skip_layerwise_casting_patterns = ["pos_embed", "x_embedder", "norm", "modulation"]

    @register_to_config
    def __init__(
        self,
        img_dim: int,
        txt_dim: int,
        img_tokens: int = 64,
        txt_tokens: int = 32,
        hidden_size: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4,
        cond_dim: int | None = None,
        patch_size: int = 2,
        in_channels: int | None = None,
        out_channels: int | None = None,
        sample_size: int | None = None,
        pos_embed_max_size: int | None = None,
        pos_embed_type: str = "sincos",
        qk_norm: str | None = None,
        txt_pre_only_last_block: bool = True,
        dual_attention_layers: tuple[int, ...] = (),
        use_text_attention_mask: bool = True,
        num_single_layers: int = 0,
        axes_dims_rope: tuple[int, ...] = (16, 56, 56),
        rope_theta: float = 10000,
        guidance_embeds: bool = False,
    ):
        super().__init__()
        check_config(locals())
        self.in_channels = in_channels or img_dim // patch_size**2
        self.out_channels = out_channels or self.in_channels
        self.img_grid = token_grid(img_tokens)
        rope = pos_embed_type == "rope"
        self.pos_grid_size = pos_embed_max_size or (None if rope else max(self.img_grid))  # None: no limit
        self.sample_size = sample_size or max(self.img_grid) * patch_size
        self.cond_dim = cond_dim = cond_dim or hidden_size

        self.x_embedder = nn.Linear(img_dim, hidden_size)
        if rope:
            self.pos_embed = RotaryPositionEmbedding(rope_theta, tuple(axes_dims_rope))
        else:
            self.pos_embed = SinCosPositionEmbedding(hidden_size, self.pos_grid_size, self.sample_size // patch_size)
        self.context_embedder = nn.Linear(txt_dim, hidden_size)
        self.timestep_mlp = MLPEmbedder(TIMESTEP_CHANNELS, hidden_size)
        self.guidance_mlp = MLPEmbedder(TIMESTEP_CHANNELS, hidden_size) if guidance_embeds else None
        self.pooled_text_mlp = MLPEmbedder(cond_dim, hidden_size)
        self.transformer_blocks = nn.ModuleList(
            MMDiTBlock(
                hidden_size,
                num_heads,
                mlp_ratio,
                qk_norm,
                txt_pre_only=txt_pre_only_last_block and i == depth - 1,
                dual_attention=i in dual_attention_layers,
            )
            for i in range(depth)
        )
        self.single_transformer_blocks = nn.ModuleList(
            SingleStreamBlock(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(num_single_layers)
        )
        self.norm_out = AdaLNModulation(hidden_size, ("final",), gated=False)
        self.proj_out = nn.Linear(hidden_size, self.out_channels * patch_size**2)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

        self.gradient_checkpointing = False
        self._register_load_state_dict_pre_hook(_migrate_legacy_keys)
        register_with_diffusers_hooks()  # diffusers' cache hooks read our blocks through its registries

    # ----------------------------------------------------------------------------------------------------------
    # Presets and helpers
    # ----------------------------------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "MMDiTTransformer2DModel":
        """Build a named size: see `mmdit_diffusers.PRESETS` ("tiny", "sd3-medium", "sd3.5-large", ...)."""
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; expected one of {sorted(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})

    @staticmethod
    def recommended_defaults() -> dict[str, Any]:
        """The recommended configuration for a new model (add `img_dim` and `txt_dim`)."""
        return dict(RECOMMENDED)

    @property
    def resolved_config(self) -> dict[str, Any]:
        """The config with every size it may leave to defaults as this model resolved them: `in_channels`,
        `out_channels`, `sample_size`, `pos_embed_max_size` (None: a rotary model has no grid limit) and `cond_dim`."""
        return {**self.config, "in_channels": self.in_channels, "out_channels": self.out_channels,
                "sample_size": self.sample_size, "pos_embed_max_size": self.pos_grid_size,
                "cond_dim": self.cond_dim}

    def output_size(self) -> int:
        """Feature size of one output token: `out_channels * patch_size**2`."""
        return self.out_channels * self.config.patch_size**2

    def set_default_attn_processor(self) -> None:
        """Our processor (`MMDiTAttnProcessor`) on every attention again, after `set_attn_processor(...)`."""
        self.set_attn_processor(MMDiTAttnProcessor())

    @classmethod
    def from_sd3(cls, model_or_path, **from_pretrained_kwargs) -> "MMDiTTransformer2DModel":
        """A diffusers `SD3Transformer2DModel`, or a diffusers-format folder / repo id holding one (read with
        `from_pretrained_kwargs`), as an MMDiT with the same weights and dtype (`mmdit_diffusers.conversion.sd3`)."""
        from diffusers import SD3Transformer2DModel

        check_sd3_source(model_or_path, from_pretrained_kwargs)
        if isinstance(model_or_path, SD3Transformer2DModel):
            sd3 = model_or_path
        else:
            sd3 = SD3Transformer2DModel.from_pretrained(model_or_path, **from_pretrained_kwargs)
        model = cls(**sd3_config_to_mmdit(sd3.config))
        _load_converted(model, sd3_state_dict_to_mmdit(sd3.state_dict(), model.config), "SD3")
        return _same_dtype(model, sd3)

    def to_sd3(self):
        """The same weights, in the same dtype, as a diffusers `SD3Transformer2DModel`."""
        from diffusers import SD3Transformer2DModel

        config = self.resolved_config
        sd3 = SD3Transformer2DModel(**mmdit_config_to_sd3(config))
        _load_converted(sd3, mmdit_state_dict_to_sd3(self.state_dict(), config), "MMDiT")
        return _same_dtype(sd3, self)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' `from_pretrained`; a failure or a partial load is explained (`loading_checks`): an SD3 folder
        points to `from_sd3`, a damaged file or weights of another depth are named."""
        want_info = kwargs.pop("output_loading_info", False)
        check_local_source(pretrained_model_name_or_path, "from_pretrained")
        try:
            model, info = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        except (OSError, ValueError, RuntimeError, TypeError) as error:
            problem = pretrained_problem(cls, pretrained_model_name_or_path, kwargs)
            if problem is None:
                raise
            raise InputError(problem) from error
        check_loading_info(cls, pretrained_model_name_or_path, kwargs, info)
        return (model, info) if want_info else model

    @classmethod
    def from_flux(cls, model_or_path, **from_pretrained_kwargs) -> "MMDiTTransformer2DModel":
        """A diffusers `FluxTransformer2DModel` (FLUX.1 [dev], [schnell], ...), or a diffusers-format folder / repo id
        holding one (read with `from_pretrained_kwargs`, e.g. `subfolder="transformer"`), as an MMDiT with the same
        weights and dtype (`mmdit_diffusers.conversion.flux`). It takes FLUX's latents unpacked ([B, 16, H, W]; our
        `patchify` is FLUX's packing) or packed with `img_ids`, the timestep as `sigma * 1000` and `guidance` as the
        guidance scale."""
        from diffusers import FluxTransformer2DModel

        if isinstance(model_or_path, (str, os.PathLike)):
            check_local_source(model_or_path, "from_flux")
            flux = FluxTransformer2DModel.from_pretrained(model_or_path, **from_pretrained_kwargs)
        elif isinstance(model_or_path, FluxTransformer2DModel):
            flux = model_or_path
        else:
            raise TypeError(
                f"`model_or_path` must be a FluxTransformer2DModel or a folder path; got {type(model_or_path).__name__}."
            )
        model = cls(**flux_config_to_mmdit(flux.config))
        _load_converted(model, flux_state_dict_to_mmdit(flux.state_dict(), model.config), "FLUX")
        return _same_dtype(model, flux)

    def to_flux(self):
        """The same weights, in the same dtype, as a diffusers `FluxTransformer2DModel` (FLUX-style configs only)."""
        from diffusers import FluxTransformer2DModel

        config = self.resolved_config
        flux = FluxTransformer2DModel(**mmdit_config_to_flux(config))
        _load_converted(flux, mmdit_state_dict_to_flux(self.state_dict(), config), "MMDiT")
        return _same_dtype(flux, self)

    @classmethod
    def _load_pretrained_model(cls, model, state_dict, resolved_model_file, pretrained_model_name_or_path,
                               loaded_keys, **kwargs):
        """diffusers' loader, after renaming a first-layout checkpoint's keys (`mmdit_diffusers.conversion.legacy`);
        every loading path of `from_pretrained` (sharded or not, `low_cpu_mem_usage` or not) goes through here."""
        if is_legacy_layout(loaded_keys):
            if state_dict is None:  # sharded: the loader would read the files itself, under the old names
                state_dict = {}
                for file in resolved_model_file:
                    state_dict.update(load_state_dict(file))
            state_dict = legacy_state_dict_to_current(state_dict)
            loaded_keys = list(state_dict)
        return super()._load_pretrained_model(model, state_dict, resolved_model_file, pretrained_model_name_or_path,
                                              loaded_keys, **kwargs)

    # ----------------------------------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------------------------------
    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
        block_controlnet_hidden_states: list[torch.Tensor] | None = None,
        skip_layers: list[int] | None = None,
        img_ids: torch.Tensor | None = None,
        txt_ids: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """
        Args:
            hidden_states: latents [B, in_channels, H, W] (H, W multiples of `patch_size`), or already patchified
                tokens [B, img_tokens, img_dim] read row-major on the `img_tokens` grid (with `"rope"` and `img_ids`:
                [B, N, img_dim], FLUX's packed latents).
            encoder_hidden_states: text tokens [B, L, txt_dim], L <= `txt_tokens`.
            pooled_projections: pooled text [B, cond_dim].
            timestep: [B] (or a scalar) in [0, 1000], `sigma * 1000` as diffusers' SD3.
            encoder_attention_mask: [B, L], 1 for real tokens, 0 for padding; padding then takes no part in attention.
            joint_attention_kwargs: passed to the attention processors, as SD3; `"scale"` scales LoRA layers instead;
                `"ip_adapter_image_embeds"` (a loaded IP-Adapter's image features) reaches them as its projection
                `ip_hidden_states`, `temb`, as SD3 (see `models.ip_adapter`).
            block_controlnet_hidden_states: ControlNet residuals [B, image tokens, hidden_size], as SD3: after block
                `i` (except a `context_pre_only` one), residual `int(i / (depth / len(residuals)))` is added to the
                image tokens.
            skip_layers: indices of double-stream blocks to skip (their inputs pass through unchanged), as SD3.5's
                skip-layer guidance.
            img_ids: with `pos_embed_type="rope"`: the image tokens' ids [N, len(axes_dims_rope)], as diffusers'
                FLUX; default FLUX's (0, row, col) on the patch grid of the latents (or of `img_tokens`).
            txt_ids: with `"rope"`: the text tokens' ids [L, len(axes_dims_rope)]; default zeros, as FLUX.
            guidance: with `guidance_embeds` (required then): the guidance scale [B] (or a scalar), e.g. 3.5 for
                FLUX.1 [dev]; embedded as the timestep `1000 * guidance`, as diffusers' FLUX does.

        Returns:
            `Transformer2DModelOutput(sample=...)` shaped like `hidden_states` (with `out_channels`), or a tuple.
        """
        hidden_states, encoder_hidden_states, pooled_projections, timestep, txt_mask = check_inputs(
            self, hidden_states, encoder_hidden_states, pooled_projections, timestep, encoder_attention_mask, img_ids
        )
        img_ids, txt_ids, guidance = check_flux_inputs(self, hidden_states, encoder_hidden_states, img_ids, txt_ids,
                                                       guidance)
        latent_input = hidden_states.ndim == 4
        skip = self._check_block_options(block_controlnet_hidden_states, skip_layers)
        attention_kwargs = dict(joint_attention_kwargs or {})
        lora_scale = attention_kwargs.pop("scale", 1.0)
        self._project_ip_adapter_image_embeds(attention_kwargs, timestep)
        # scaled LoRA layers are unscaled however the blocks end (an InputError inside one included), as diffusers'
        # `apply_lora_scale`, which reads only a keyword `joint_attention_kwargs`
        if USE_PEFT_BACKEND and lora_scale != 1.0:
            scale_lora_layers(self, lora_scale)
        try:
            p = self.config.patch_size
            if latent_input:
                height, width = hidden_states.shape[-2:]
                rows, cols = height // p, width // p
                img = patchify(hidden_states, p)
            else:
                (rows, cols), img = self.img_grid, hidden_states
            rope = self.config.pos_embed_type == "rope"
            img = self.x_embedder(img)
            if rope:
                img_ids = image_ids(rows, cols, img.device) if img_ids is None else img_ids
                txt_ids = text_ids(encoder_hidden_states.shape[1], img.device) if txt_ids is None else txt_ids
            else:
                img = img + self.pos_embed(rows, cols).to(img.dtype)
            txt = self.context_embedder(encoder_hidden_states)
            vec = self.timestep_mlp(sinusoidal_timestep(timestep).to(pooled_projections.dtype))
            if self.guidance_mlp is not None:
                vec = vec + self.guidance_mlp(sinusoidal_guidance(guidance).to(pooled_projections.dtype))
            vec = vec + self.pooled_text_mlp(pooled_projections)
            txt, txt_mask, txt_ids = _drop_shared_padding(txt, txt_mask, txt_ids)
            rotary = self.pos_embed(txt_ids, img_ids) if rope else None

            # each block's arguments after (img, txt), in `MMDiTBlock.forward`'s (and `SingleStreamBlock.forward`'s)
            # order; with sin-cos positions no rotary embedding (the positions were added to the image tokens above)
            block_args = (vec, txt_mask, rotary, attention_kwargs or None)
            for index, block in enumerate(self.transformer_blocks):
                if index not in skip:
                    if torch.is_grad_enabled() and self.gradient_checkpointing:
                        img, txt = self._gradient_checkpointing_func(block, img, txt, *block_args)
                    else:
                        img, txt = block(img, txt, *block_args)
                if block_controlnet_hidden_states is not None and not block.context_pre_only:
                    interval = len(self.transformer_blocks) / len(block_controlnet_hidden_states)
                    img = img + block_controlnet_hidden_states[int(index / interval)]
            for block in self.single_transformer_blocks:
                if torch.is_grad_enabled() and self.gradient_checkpointing:
                    img, txt = self._gradient_checkpointing_func(block, img, txt, *block_args)
                else:
                    img, txt = block(img, txt, *block_args)

            final = self.norm_out(vec)["final"]
            out = self.proj_out(final.modulate(layer_norm(img)))
            if latent_input:
                out = unpatchify(out, p, height, width)
            warn_if_not_finite(out, {"hidden_states": hidden_states, "encoder_hidden_states": encoder_hidden_states,
                                     "pooled_projections": pooled_projections, "timestep": timestep})
        finally:
            if USE_PEFT_BACKEND and lora_scale != 1.0:
                unscale_lora_layers(self, lora_scale)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    def _check_block_options(self, block_controlnet_hidden_states, skip_layers) -> frozenset[int]:
        """Refuse an empty residual list and block indices out of range; returns the blocks to skip."""
        if block_controlnet_hidden_states is not None and len(block_controlnet_hidden_states) == 0:
            raise InputError("`block_controlnet_hidden_states` is empty; pass None or at least one residual.")
        if not skip_layers:
            return frozenset()
        depth = len(self.transformer_blocks)
        bad = [i for i in skip_layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < depth]
        if bad:
            raise InputError(f"`skip_layers` {bad} are not block indices; expected integers in 0..{depth - 1}.")
        return frozenset(skip_layers)


def _load_converted(model: nn.Module, state_dict: dict, source: str) -> None:
    """Load converted weights; names missing or left over are a ValueError naming them (a tensor of another shape is
    torch's RuntimeError, as `load_state_dict` raises it). `model` is new, so what loaded before the error is moot."""
    result = model.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"Converted {source} weights do not fit: missing {sorted(result.missing_keys)}, "
                         f"unexpected {sorted(result.unexpected_keys)}.")


def _migrate_legacy_keys(state_dict, prefix, *args) -> None:
    """`load_state_dict` pre-hook: first-layout keys renamed in place (`mmdit_diffusers.conversion.legacy`)."""
    keys = [key for key in state_dict if key.startswith(prefix)]
    if is_legacy_layout(keys):
        for key, value in legacy_state_dict_to_current({key: state_dict.pop(key) for key in keys}).items():
            state_dict[key] = value


def _same_dtype(model: nn.Module, like: nn.Module) -> nn.Module:
    dtype = next(like.parameters()).dtype
    return model if next(model.parameters()).dtype == dtype else model.to(dtype)


def _drop_shared_padding(txt: torch.Tensor, txt_mask: torch.Tensor | None, txt_ids: torch.Tensor | None = None):
    """Remove text positions that are padding for every prompt in the batch (and their rotary ids): they never
    act as keys, and their own outputs are never read, so the result is the same for less work. A mask that is
    then all ones is dropped too (faster attention kernels). Skipped under torch.compile (data-dependent shapes)."""
    if txt_mask is None or torch.compiler.is_compiling():
        return txt, txt_mask, txt_ids
    keep = txt_mask.any(dim=0)
    if not bool(keep.all()):
        txt, txt_mask = txt[:, keep], txt_mask[:, keep]
        txt_ids = None if txt_ids is None else txt_ids[keep]
    return txt, (None if bool(txt_mask.all()) else txt_mask), txt_ids
