"""LoRA on the pipeline's transformer and CLIP text encoders: diffusers' `LoraBaseMixin` API, as
`StableDiffusion3Pipeline`'s (`SD3LoraLoaderMixin`), over the transformer's `PeftAdapterMixin` and PEFT.

Files: diffusers' own (`pytorch_lora_weights.safetensors`, PEFT-format keys prefixed `transformer.`,
`text_encoder.`, `text_encoder_2.`; a dict of unprefixed PEFT keys is read as the transformer's) and kohya-style SD3 /
SD3.5 files (`lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight`, `lora_te1_...`, `.alpha`; converted by
`conversion.kohya_sd3_lora`, where diffusers' SD3 pipeline loads none of their keys). LoRAs trained on diffusers'
`SD3Transformer2DModel` (`transformer.transformer_blocks.0.ff.net.2.lora_A.weight`) or, for a FLUX-style
transformer, `FluxTransformer2DModel` are converted to this transformer's names and layouts on load
(`convert_lora_state_dict`), so SD3 and FLUX.1 LoRAs work on pipelines loaded from SD3 / FLUX folders. Keys that
no component can take raise `InputError`, named, instead of being skipped. `load_lora_weights` reads safetensors only; a pickled
checkpoint (`.bin`) runs code when it is opened, so it is refused unless the caller passes `allow_pickle=True`.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from diffusers.loaders.lora_base import LoraBaseMixin, _fetch_state_dict, _load_lora_into_text_encoder
from diffusers.utils import USE_PEFT_BACKEND, logging, scale_lora_layers, unscale_lora_layers

from ..conversion.flux import flux_module_name_to_mmdit, flux_tensor_to_mmdit, is_flux_module_name
from ..conversion.kohya_sd3_lora import is_kohya_lora, kohya_sd3_lora_to_peft
from ..conversion.sd3 import is_sd3_module_name, sd3_module_name_to_mmdit, sd3_tensor_to_mmdit
from ..errors import SHOWN_KEYS as _SHOWN, InputError

logger = logging.get_logger(__name__)

TRANSFORMER_NAME = "transformer"
TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2")
_LORA_KEY = re.compile(r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_magnitude_vector)(?P<rest>(\.[^.]+)*)$")


class MMDiTLoraLoaderMixin(LoraBaseMixin):
    """`load_lora_weights`, `save_lora_weights`, `unload_lora_weights`, `set_adapters`, `fuse_lora`, ... for the
    `transformer`, `text_encoder` and `text_encoder_2` components, as `StableDiffusion3Pipeline`."""

    _lora_loadable_modules = [TRANSFORMER_NAME, *TEXT_ENCODER_NAMES]
    transformer_name = TRANSFORMER_NAME
    text_encoder_name = TEXT_ENCODER_NAMES[0]

    @classmethod
    def lora_state_dict(cls, pretrained_model_name_or_path_or_dict, allow_pickle: bool = False, **kwargs):
        """The LoRA state dict (and, with `return_lora_metadata=True`, its adapter metadata) of a folder, file, Hub
        repo or dict: diffusers' PEFT-format keys, a kohya file's converted to them (SD3 module names are converted
        to ours by `load_lora_weights`).

        Args:
            pretrained_model_name_or_path_or_dict: A folder or Hub repo holding `pytorch_lora_weights.safetensors`
                (or `weight_name`), a `.safetensors` file, or a state dict.
            allow_pickle (`bool`, defaults to `False`): Also read pickled `.bin` checkpoints. Only for files you trust.
            kwargs: `weight_name`, `subfolder`, `use_safetensors`, `return_lora_metadata` and the Hub options
                (`cache_dir`, `force_download`, `proxies`, `local_files_only`, `token`, `revision`).
        """
        return_lora_metadata = kwargs.pop("return_lora_metadata", False)
        state_dict, metadata = cls._read_lora(pretrained_model_name_or_path_or_dict, allow_pickle, **kwargs)
        if is_kohya_lora(state_dict):
            state_dict = kohya_sd3_lora_to_peft(state_dict)
        return (state_dict, metadata) if return_lora_metadata else state_dict

    @classmethod
    def _read_lora(cls, source, allow_pickle: bool, **kwargs):
        """(state dict, adapter metadata) as the file stores them, less DoRA scales; see `lora_state_dict`."""
        weight_name = kwargs.pop("weight_name", None)
        use_safetensors = kwargs.pop("use_safetensors", None)
        if not isinstance(source, dict) and not allow_pickle:
            pickled = use_safetensors is False or (weight_name is not None and not weight_name.endswith(".safetensors"))
            pickled = pickled or (os.path.isfile(source) and not str(source).endswith(".safetensors"))
            if pickled:
                raise ValueError(
                    f"Refusing to load a pickled LoRA checkpoint ({weight_name or source}): pickle can run arbitrary "
                    "code. Use a `.safetensors` file, or pass `allow_pickle=True` if you trust the file."
                )
        try:
            state_dict, metadata = _fetch_state_dict(
                pretrained_model_name_or_path_or_dict=source,
                weight_name=weight_name,
                use_safetensors=True if use_safetensors is None else use_safetensors,
                local_files_only=kwargs.pop("local_files_only", None),
                cache_dir=kwargs.pop("cache_dir", None),
                force_download=kwargs.pop("force_download", False),
                proxies=kwargs.pop("proxies", None),
                token=kwargs.pop("token", None),
                revision=kwargs.pop("revision", None),
                subfolder=kwargs.pop("subfolder", None),
                user_agent={"file_type": "attn_procs_weights", "framework": "pytorch"},
                allow_pickle=allow_pickle,
            )
        except OSError as error:
            if allow_pickle:
                raise
            raise ValueError(
                f"No safetensors LoRA weights found in {source!r} ({error}). Pickled `.bin` checkpoints are only read "
                "with `allow_pickle=True`."
            ) from error
        if kwargs:
            logger.warning(f"Ignoring unexpected `lora_state_dict` arguments: {sorted(kwargs)}.")

        if any("dora_scale" in k for k in state_dict):
            logger.warning("Dropping this checkpoint's `dora_scale` entries: DoRA files in that form are not supported.")
            state_dict = {k: v for k, v in state_dict.items() if "dora_scale" not in k}
        return state_dict, metadata

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict,
        adapter_name: str | None = None,
        hotswap: bool = False,
        allow_pickle: bool = False,
        **kwargs,
    ):
        """Load a LoRA into the transformer and, where the file has their keys, the CLIP text encoders, as adapter
        `adapter_name` (see `lora_state_dict` for the sources).

        Weight it with `set_adapters`, or per call with `joint_attention_kwargs={"scale": s}` (the transformer);
        remove it with `unload_lora_weights` or `delete_adapters`.
        """
        low_cpu_mem_usage = kwargs.pop("low_cpu_mem_usage", False)
        if isinstance(pretrained_model_name_or_path_or_dict, dict):
            pretrained_model_name_or_path_or_dict = dict(pretrained_model_name_or_path_or_dict)
        state_dict, metadata = self._read_lora(pretrained_model_name_or_path_or_dict, allow_pickle, **kwargs)
        kohya = is_kohya_lora(state_dict)
        if kohya:
            state_dict = kohya_sd3_lora_to_peft(state_dict)
            logger.info("Converted a kohya-style SD3 LoRA to diffusers' format.")
        parts = self._split_by_component(state_dict)
        transformer = getattr(self, self.transformer_name)
        if parts[self.transformer_name]:
            transformer_state, transformer_metadata = convert_lora_state_dict(
                parts[self.transformer_name], transformer, metadata, foreign=kohya
            )
            self.load_lora_into_transformer(
                transformer_state,
                transformer=transformer,
                adapter_name=adapter_name,
                metadata=transformer_metadata,
                _pipeline=self,
                low_cpu_mem_usage=low_cpu_mem_usage,
                hotswap=hotswap,
            )
        for name in TEXT_ENCODER_NAMES:
            if parts[name]:
                self.load_lora_into_text_encoder(
                    parts[name],
                    network_alphas=None,
                    text_encoder=getattr(self, name),
                    prefix=name,
                    lora_scale=self.lora_scale,
                    adapter_name=adapter_name,
                    metadata=metadata,
                    _pipeline=self,
                    low_cpu_mem_usage=low_cpu_mem_usage,
                    hotswap=hotswap,
                )

    def _split_by_component(self, state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """The LoRA keys per component (still prefixed); a dict of nothing but unprefixed LoRA keys (PEFT's own
        `get_peft_model_state_dict`) belongs to the transformer.
        Raises `InputError` naming the keys no component of this pipeline can take."""
        names = (self.transformer_name, *TEXT_ENCODER_NAMES)
        prefixed = any(key.startswith(tuple(f"{name}." for name in names)) for key in state_dict)
        if state_dict and not prefixed and all("lora" in key for key in state_dict):
            state_dict = {f"{self.transformer_name}.{key}": value for key, value in state_dict.items()}
        parts = {name: {} for name in names}
        unusable = []
        for key, value in state_dict.items():
            name = key.split(".", 1)[0]
            if name in parts and getattr(self, name, None) is not None and "lora" in key:
                parts[name][key] = value
            else:
                unusable.append(key)
        if unusable:
            found = f"{len(unusable)} of its {len(state_dict)} keys, e.g. {sorted(unusable)[:_SHOWN]}"
            absent = sorted({k.split(".", 1)[0] for k in unusable} & set(names))
            raise InputError(
                (f"The LoRA has no usable key: {found}." if len(unusable) == len(state_dict) else
                 f"The LoRA has keys no component can take: {found}.")
                + (f" This pipeline has no {absent}." if absent else "")
                + " Loadable: diffusers / PEFT keys (`transformer.<module>.lora_A.weight`, `text_encoder.`, "
                "`text_encoder_2.`) and kohya SD3 keys (`lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight`, "
                "`lora_te1_...`, `lora_te2_...`)."
            )
        return parts

    @classmethod
    def load_lora_into_transformer(
        cls,
        state_dict,
        transformer,
        adapter_name=None,
        _pipeline=None,
        low_cpu_mem_usage=False,
        hotswap=False,
        metadata=None,
    ):
        logger.info(f"Loading {cls.transformer_name}.")
        transformer.load_lora_adapter(
            state_dict,
            network_alphas=None,
            adapter_name=adapter_name,
            metadata=metadata,
            _pipeline=_pipeline,
            low_cpu_mem_usage=low_cpu_mem_usage,
            hotswap=hotswap,
            prefix=cls.transformer_name,
        )

    @classmethod
    def load_lora_into_text_encoder(
        cls,
        state_dict,
        network_alphas,
        text_encoder,
        prefix=None,
        lora_scale=1.0,
        adapter_name=None,
        _pipeline=None,
        low_cpu_mem_usage=False,
        hotswap=False,
        metadata=None,
    ):
        """Load the `prefix.`-keyed part of `state_dict` into `text_encoder` (diffusers' own text-encoder loader)."""
        _load_lora_into_text_encoder(
            state_dict=state_dict,
            network_alphas=network_alphas,
            lora_scale=lora_scale,
            text_encoder=text_encoder,
            prefix=prefix,
            text_encoder_name=cls.text_encoder_name,
            adapter_name=adapter_name,
            metadata=metadata,
            _pipeline=_pipeline,
            low_cpu_mem_usage=low_cpu_mem_usage,
            hotswap=hotswap,
        )

    @classmethod
    def save_lora_weights(
        cls,
        save_directory: str | os.PathLike,
        transformer_lora_layers: dict[str, torch.nn.Module | torch.Tensor] | None = None,
        text_encoder_lora_layers: dict[str, torch.nn.Module | torch.Tensor] | None = None,
        text_encoder_2_lora_layers: dict[str, torch.nn.Module | torch.Tensor] | None = None,
        is_main_process: bool = True,
        weight_name: str | None = None,
        save_function: Callable | None = None,
        safe_serialization: bool = True,
        transformer_lora_adapter_metadata: dict | None = None,
        text_encoder_lora_adapter_metadata: dict | None = None,
        text_encoder_2_lora_adapter_metadata: dict | None = None,
    ):
        """Write the LoRA state dicts (e.g. `peft.get_peft_model_state_dict(pipe.transformer)`) as
        `save_directory/pytorch_lora_weights.safetensors`, keys prefixed by component, as SD3's."""
        layers = {cls.transformer_name: transformer_lora_layers, "text_encoder": text_encoder_lora_layers,
                  "text_encoder_2": text_encoder_2_lora_layers}
        metadata = {cls.transformer_name: transformer_lora_adapter_metadata,
                    "text_encoder": text_encoder_lora_adapter_metadata,
                    "text_encoder_2": text_encoder_2_lora_adapter_metadata}
        layers = {name: value for name, value in layers.items() if value}
        if not layers:
            raise ValueError(
                "Pass `transformer_lora_layers`, `text_encoder_lora_layers` or `text_encoder_2_lora_layers`: the LoRA "
                "state dict of the transformer or a text encoder."
            )
        cls._save_lora_weights(
            save_directory=save_directory,
            lora_layers=layers,
            lora_metadata={name: metadata[name] for name in layers},
            is_main_process=is_main_process,
            weight_name=weight_name,
            save_function=save_function,
            safe_serialization=safe_serialization,
        )

    def fuse_lora(
        self,
        components: list[str] = [TRANSFORMER_NAME, *TEXT_ENCODER_NAMES],  # noqa: B006 (diffusers' signature)
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names: list[str] | None = None,
        **kwargs,
    ):
        super().fuse_lora(
            components=components, lora_scale=lora_scale, safe_fusing=safe_fusing, adapter_names=adapter_names, **kwargs
        )

    def unfuse_lora(self, components: list[str] = [TRANSFORMER_NAME, *TEXT_ENCODER_NAMES], **kwargs):  # noqa: B006
        super().unfuse_lora(components=components, **kwargs)


@dataclass(frozen=True)
class _ForeignNaming:
    """How a diffusers transformer family names and lays out the modules a LoRA targets (`mmdit_diffusers.conversion`)."""

    label: str
    is_own_name: Callable[[str], bool]  # a module name only that family uses
    to_ours: Callable[[str], str | None]
    tensor_to_ours: Callable[..., torch.Tensor]


SD3_NAMING = _ForeignNaming("SD3", is_sd3_module_name, sd3_module_name_to_mmdit, sd3_tensor_to_mmdit)
FLUX_NAMING = _ForeignNaming("FLUX", is_flux_module_name, flux_module_name_to_mmdit, flux_tensor_to_mmdit)


def foreign_naming(transformer) -> _ForeignNaming:
    """The diffusers family whose LoRAs fit `transformer`: FLUX's for FLUX-style configs (rotary positions), SD3's
    otherwise."""
    return FLUX_NAMING if transformer.config.get("pos_embed_type") == "rope" else SD3_NAMING


def convert_lora_state_dict(
    state_dict: dict[str, torch.Tensor], transformer, metadata: dict | None = None, foreign: bool = False
):
    """Rename a LoRA trained on diffusers' `SD3Transformer2DModel` (or, for a FLUX-style `transformer`,
    `FluxTransformer2DModel`) to the modules of `transformer`, with the weight conversion's layout changes
    (`mmdit_diffusers.conversion.sd3` / `.flux`: names by `*_module_name_to_mmdit`, tensors by `*_tensor_to_mmdit`).

    Returns `(state_dict, metadata)`; the adapter metadata (LoraConfig kwargs) gets the converted module names.
    A LoRA already in our naming is returned unchanged. A LoRA on nothing but the modules both namings share (the
    attention layers, `context_embedder`, `norm_out.linear`, `proj_out`, FLUX's single-stream blocks) is read as
    ours: the namings agree on the layout of every one of them but `norm_out.linear` (and SD3's `proj_out`), whose
    rows they order differently, and nothing in such a file says which model it was trained on; `foreign=True` says
    it (a converted kohya file is SD3's)."""
    naming = foreign_naming(transformer)
    prefix = f"{TRANSFORMER_NAME}."
    if not foreign and not any(naming.is_own_name(_split_lora_key(k.removeprefix(prefix))[0]) for k in state_dict):
        return state_dict, metadata
    converted, modules = {}, set()
    for key, tensor in state_dict.items():
        has_prefix = key.startswith(prefix)
        module, part, rest = _split_lora_key(key.removeprefix(prefix))
        ours = naming.to_ours(module) if part is not None else None
        if ours is None:
            raise InputError(
                f"LoRA key {key!r} targets {naming.label} module {module!r}, which has no MMDiT counterpart."
            )
        # lora_B (and a DoRA magnitude) is per output row of the module; lora_A's rows are the rank
        tensor = naming.tensor_to_ours(module, tensor, transformer.config, output_rows=part != "lora_A")
        converted[(prefix if has_prefix else "") + f"{ours}.{part}{rest}"] = tensor
        modules.add(ours)
    if metadata:
        metadata = dict(metadata)
        for key in list(metadata):
            name = key.removeprefix(prefix)
            if name == "target_modules":
                metadata[key] = sorted(modules)
            elif name in ("rank_pattern", "alpha_pattern") and isinstance(metadata[key], dict):
                metadata[key] = {naming.to_ours(k) or k: v for k, v in metadata[key].items()}
    logger.info(f"Converted a {naming.label}-format LoRA to MMDiT module names.")
    return converted, metadata


def _split_lora_key(key: str):
    match = _LORA_KEY.match(key)
    return (match["module"], match["part"], match["rest"]) if match else (key, None, "")


@contextmanager
def text_encoder_lora_scale(pipeline, scale: float | None):
    """Scale the LoRAs of the first two text encoders by `scale` while encoding, as diffusers' SD3 and FLUX
    pipelines do with `joint_attention_kwargs={"scale": s}` (SD3: both CLIPs; FLUX.1: CLIP and T5)."""
    encoders = []
    if USE_PEFT_BACKEND and scale is not None and scale != 1.0:
        encoders = [e for e in (getattr(pipeline, n, None) for n in ("text_encoder", "text_encoder_2")) if e is not None]
    for encoder in encoders:
        scale_lora_layers(encoder, scale)
    try:
        yield
    finally:
        for encoder in encoders:
            unscale_lora_layers(encoder, scale)
