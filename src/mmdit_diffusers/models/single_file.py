"""`from_single_file` for the transformer: Stability AI's original SD3 / SD3.5 files (`.safetensors`, GGUF).

diffusers' own `FromOriginalModelMixin` serves only the classes listed in its table, so this is the same procedure
for our class, built from diffusers' parts: `load_single_file_checkpoint` reads the file (local, a Hub link, or GGUF
through the `gguf` package), a diffusers quantizer (`GGUFQuantizationConfig`, ...) prepares the model, and
`load_model_dict_into_meta` fills it. The names go original -> SD3 (`conversion.sd3_original`) -> ours
(`conversion.sd3`); the config is read off the tensors unless `config=` names a folder or repo that has it.
"""

from __future__ import annotations

import inspect
import os
from typing import Mapping

import torch
from accelerate import init_empty_weights
from diffusers.loaders.single_file_utils import VALID_URL_PREFIXES, load_single_file_checkpoint
from diffusers.models.model_loading_utils import load_model_dict_into_meta
from diffusers.quantizers import DiffusersAutoQuantizer

from ..conversion.sd3 import sd3_config_to_mmdit, sd3_state_dict_to_mmdit
from ..conversion.sd3_original import (
    infer_sd3_config,
    is_original_sd3,
    original_state_dict_to_sd3,
    strip_original_prefix,
)
from ..errors import SHOWN_KEYS as _SHOWN, InputError
from .loading_checks import HUB_OPTIONS, SD3_CLASS, shape_diff



class MMDiTSingleFileMixin:
    """`from_single_file(path_or_link_or_dict, ...)` for `MMDiTTransformer2DModel`."""

    @classmethod
    def from_single_file(cls, pretrained_model_link_or_path_or_dict=None, **kwargs):
        r"""
        Load a transformer from an original-layout SD3 / SD3.5 file, as diffusers' `from_single_file` does for
        `SD3Transformer2DModel`. The model is in evaluation mode.

        Parameters:
            pretrained_model_link_or_path_or_dict (`str` or `dict`): A `.safetensors` or `.gguf` file (a whole
                pipeline file too: only `model.diffusion_model.*` is read), a Hub link
                (`https://huggingface.co/<repo_id>/blob/main/<file>`), or a state dict.
            config (`str`, *optional*): A folder or Hub repo whose `config.json` (in `subfolder`) describes the
                transformer: diffusers' `SD3Transformer2DModel` config or ours. Without it the config is read off the
                tensors: depth, widths, channels, patch size, QK-norm, dual-attention blocks, `pos_embed_max_size` and
                `sample_size`; the head count from the QK-norm weights, else SD3's head size 64 (pass `num_heads=`
                or `config=` for a checkpoint that breaks that convention).
            subfolder (`str`, *optional*): The config's subfolder in `config` (for a local pipeline folder
                `transformer` is found by itself).
            dtype (`torch.dtype`, *optional*): Load the weights in this dtype (default float32, as diffusers).
                `torch_dtype` is accepted too.
            quantization_config (*optional*): A diffusers quantization config, e.g.
                `GGUFQuantizationConfig(compute_dtype=torch.bfloat16)` for a `.gguf` file (needs `pip install gguf`):
                the quantized Linear weights stay quantized (diffusers' `GGUFLinear`).
            device (`str` or `torch.device`, *optional*): Where the weights are put (default CPU).
            disable_mmap (`bool`, defaults to `False`): Read a safetensors file at once instead of memory-mapping it.
            low_cpu_mem_usage (`bool`, defaults to `True`): Accepted as diffusers does; the model is always built
                empty and filled once (`False` is refused with a quantization config, as in diffusers).
            config_revision (`str`, *optional*): The revision of a Hub `config`.
            force_download, proxies, token, cache_dir, local_files_only, revision: Hub options for a link.
            kwargs: Our constructor arguments (`use_text_attention_mask`, `num_heads`, ...) override the config.
        """
        config = kwargs.pop("config", None)
        subfolder = kwargs.pop("subfolder", None)
        dtype, torch_dtype = kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None)
        dtype = torch_dtype if dtype is None else dtype
        quantization_config = kwargs.pop("quantization_config", None)
        device = kwargs.pop("device", None)
        disable_mmap = kwargs.pop("disable_mmap", False)
        config_revision = kwargs.pop("config_revision", None)
        low_cpu_mem_usage = kwargs.pop("low_cpu_mem_usage", True)
        hub = {name: kwargs.pop(name) for name in HUB_OPTIONS if name in kwargs}
        config_keys = cls._get_init_keys(cls) - {"self"}
        overrides = {name: kwargs.pop(name) for name in list(kwargs) if name in config_keys}
        if kwargs:
            raise InputError(
                f"`from_single_file` got unexpected arguments {sorted(kwargs)}; it takes the loading options in its "
                f"docstring and the config options {sorted(config_keys)}."
            )
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise InputError(f"`dtype` must be a torch.dtype such as torch.bfloat16; got {dtype!r}.")

        checkpoint = read_checkpoint(pretrained_model_link_or_path_or_dict, hub, disable_mmap)
        quantizer = None
        if quantization_config is not None:
            if not low_cpu_mem_usage:
                raise InputError("`low_cpu_mem_usage=False` cannot be used with `quantization_config`.")
            quantizer = DiffusersAutoQuantizer.from_config(quantization_config)
            quantizer.validate_environment()
            dtype = quantizer.update_torch_dtype(dtype)
            checkpoint = quantizer.maybe_update_state_dict(checkpoint)

        original = strip_original_prefix(checkpoint)
        if not is_original_sd3(original):
            raise InputError(
                f"`pretrained_model_link_or_path_or_dict` is not an original-layout SD3 / SD3.5 checkpoint (no "
                f"`model.diffusion_model.joint_blocks.N.*` or `joint_blocks.N.*` tensors): {_examples(checkpoint)}."
            )
        original = {key: _dequantize_unless_linear_weight(key, t) for key, t in original.items()}

        if config is not None:
            model_config = _config_from(cls, config, subfolder, {**hub, "revision": config_revision})
        else:
            model_config = sd3_config_to_mmdit(infer_sd3_config(original, num_heads=overrides.get("num_heads")))
        model_config.update(overrides)
        with init_empty_weights():
            model = cls.from_config(model_config)
        resolved = model.resolved_config  # the sizes a config may leave to defaults, as the model resolved them
        try:
            state_dict = sd3_state_dict_to_mmdit(original_state_dict_to_sd3(original), resolved)
        except InputError:
            raise
        except ValueError as error:  # conversion.sd3 names what does not fit
            raise InputError(f"The checkpoint does not fit the config: {error}") from error
        _check_fits(model, state_dict)

        # as diffusers: `_keep_in_fp32_modules` for float16, and for quantizers that ask for it
        wants_fp32 = dtype == torch.float16 or getattr(quantizer, "use_keep_in_fp32_modules", False)
        keep_in_fp32 = list(cls._keep_in_fp32_modules or []) if wants_fp32 else []
        if quantizer is not None:
            quantizer.preprocess_model(model=model, device_map=None, state_dict=state_dict,
                                       keep_in_fp32_modules=keep_in_fp32)
        load_model_dict_into_meta(model, state_dict, dtype=dtype, device_map={"": torch.device(device or "cpu")},
                                  hf_quantizer=quantizer, keep_in_fp32_modules=keep_in_fp32)
        if quantizer is not None:
            quantizer.postprocess_model(model)
            model.hf_quantizer = quantizer
        elif dtype is not None:
            model.to(dtype)
        return model.eval()


def read_checkpoint(source, hub: dict, disable_mmap: bool,
                    argument: str = "pretrained_model_link_or_path_or_dict") -> dict:
    """The tensors of a single file or Hub link (or a state dict, when `argument` accepts one: its name ends in
    `_or_dict`); a missing file is an `InputError` naming `argument`, not sent to the Hub."""
    takes_dict = argument.endswith("_or_dict")
    if takes_dict and isinstance(source, Mapping):
        return dict(source)
    accepted = "a file path, a Hub link or a state dict" if takes_dict else "a file path or a Hub link"
    if not isinstance(source, (str, os.PathLike)):
        raise InputError(f"`{argument}` must be {accepted}; got {type(source).__name__}.")
    source = os.fspath(source)
    if not os.path.isfile(source) and not source.startswith(tuple(VALID_URL_PREFIXES)):
        raise InputError(
            f"`{argument}`: no file at {source!r}; expected a `.safetensors` or `.gguf` file"
            f"{',' if takes_dict else ' or'} a Hub link (https://huggingface.co/<repo_id>/blob/main/<file>)"
            f"{' or a state dict' if takes_dict else ''}."
        )
    return dict(load_single_file_checkpoint(source, disable_mmap=disable_mmap, **hub))


def _dequantize_unless_linear_weight(key: str, tensor: torch.Tensor) -> torch.Tensor:
    """GGUF quantizes what it likes; only Linear weights stay quantized (diffusers' `GGUFLinear`), so a quantized
    position table, norm or bias is dequantized here, before the conversion reads or reshapes it."""
    if not hasattr(tensor, "quant_type") or (tensor.ndim == 2 and key.endswith(".weight")):
        return tensor
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    return dequantize_gguf_tensor(tensor)


def _config_from(cls, config, subfolder: str | None, hub: dict) -> dict:
    """Our constructor arguments from the `config.json` of a folder or repo: SD3's (converted) or ours."""
    config = os.fspath(config)
    if subfolder is None and os.path.isdir(config) and not os.path.isfile(os.path.join(config, "config.json")):
        if os.path.isfile(os.path.join(config, "transformer", "config.json")):
            subfolder = "transformer"
    try:
        raw = cls.load_config(config, subfolder=subfolder, **{k: v for k, v in hub.items() if v is not None})
    except (OSError, ValueError) as error:
        raise InputError(f"`config`={config!r} (subfolder {subfolder!r}): no readable config.json ({error}).") from error
    class_name = raw.get("_class_name")
    if class_name == SD3_CLASS:
        from diffusers import SD3Transformer2DModel

        defaults = {name: p.default for name, p in inspect.signature(SD3Transformer2DModel.__init__).parameters.items()
                    if name != "self"}
        return sd3_config_to_mmdit({**defaults, **{k: v for k, v in raw.items() if k in defaults}})
    if class_name == cls.__name__:
        return {k: v for k, v in raw.items() if not k.startswith("_")}
    raise InputError(
        f"`config`={config!r} describes a {class_name!r}; expected {SD3_CLASS} or {cls.__name__}."
    )


def _check_fits(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Every parameter present with its shape (a GGUF tensor by its dequantized shape), nothing left over."""
    expected = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    got = {key: tuple(getattr(tensor, "quant_shape", tensor.shape)) for key, tensor in state_dict.items()}
    missing, unexpected, reshaped = shape_diff(expected, got)
    mismatched = [f"{key}: {got[key]} vs {expected[key]}" for key in reshaped]
    problems = [f"{what} ({len(keys)}): {keys[:_SHOWN]}" for what, keys in
                (("missing", missing), ("unexpected", unexpected), ("checkpoint vs model shapes", mismatched)) if keys]
    if problems:
        raise InputError("The checkpoint does not fit the model's config: " + "; ".join(problems) + ".")


def _examples(keys) -> str:
    keys = sorted(keys)
    return f"{len(keys)} keys, e.g. {keys[:_SHOWN]}"
