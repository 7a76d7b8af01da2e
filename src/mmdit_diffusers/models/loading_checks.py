"""What `MMDiTTransformer2DModel` loads: the checks around `from_pretrained`, `from_sd3` and `from_flux`.

    check_local_source(path, method)          a path that is no folder and no Hub repo id is refused, not sent to
                                              the Hub
    check_sd3_source(model_or_path, kwargs)   what `from_sd3` is given, before it reads it (an MMDiT folder is
                                              pointed to `from_pretrained`, a pipeline folder to subfolder=)
    pretrained_problem(cls, path, kwargs)     why `from_pretrained` failed, in words, or None: a folder of another
                                              class (an SD3 transformer: use `from_sd3`), a pipeline folder, a
                                              damaged weights file (`files.safetensors_problem`), weights of another
                                              depth or size than config.json (`weights_mismatch`)
    check_loading_info(cls, path, kwargs, info)
                                              weights that loaded only in part are refused, unless the caller passed
                                              `ignore_mismatched_sizes=True`; an IP-Adapter saved with the
                                              transformer is left out with a warning (`load_ip_adapter` loads it)
    shape_diff(expected, got)                 the names missing, unexpected and of another shape, between two
                                              name -> shape maps (also `from_single_file`'s check)
"""

from __future__ import annotations

import os
import re
from typing import Mapping

from diffusers.utils import logging

from ..errors import InputError
from ..files import config_class_name, is_missing_local_path, safetensors_problem, safetensors_shapes

logger = logging.get_logger(__name__)

SD3_CLASS = "SD3Transformer2DModel"
# the Hub options that diffusers' loaders take (`from_pretrained`, `load_config`, `from_single_file`)
HUB_OPTIONS = ("force_download", "proxies", "token", "cache_dir", "local_files_only", "revision")
# what a loaded IP-Adapter adds to a transformer's state dict (diffusers' SD3 layout): the image projection and the
# attention processors' own projections
IP_ADAPTER_KEY = re.compile(r"^image_proj\.|\.processor\.")
MMDIT_CLASS = "MMDiTTransformer2DModel"

def _local_folder(path, kwargs: dict) -> str | None:
    """The local folder `from_pretrained(path, subfolder=...)` reads, or None for a Hub repo id."""
    folder = os.path.normpath(os.path.join(os.fspath(path), kwargs.get("subfolder") or ""))
    return folder if os.path.isdir(os.fspath(path)) else None


def _class_name(folder: str) -> str | None:
    return config_class_name(os.path.join(folder, "config.json"))


def check_local_source(path, method: str) -> None:
    """A path that names no local folder and cannot be a Hub repo id ("org/name") is refused here, not sent to
    the Hub."""
    if is_missing_local_path(path):
        raise InputError(f"`{method}`: {os.fspath(path)} is no folder (and not a Hub repo id such as "
                         "'stabilityai/stable-diffusion-3.5-medium').")


def check_sd3_source(path, kwargs: dict) -> None:
    """`from_sd3(path)`: a model (not a path) must be an `SD3Transformer2DModel`; a local folder must exist and hold
    one (an MMDiT folder is pointed to `from_pretrained`); a missing local path is not sent to the Hub."""
    from diffusers import SD3Transformer2DModel

    if isinstance(path, SD3Transformer2DModel):
        return
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`model_or_path` must be an SD3Transformer2DModel or a folder path; got {type(path).__name__}.")
    check_local_source(path, "from_sd3")
    text = os.fspath(path)
    if not os.path.exists(text):
        return
    folder = os.path.normpath(os.path.join(text, kwargs.get("subfolder") or ""))
    name = _class_name(folder)
    if name == MMDIT_CLASS:
        raise InputError(f"`from_sd3`: {folder} already holds an {MMDIT_CLASS}; load it with "
                         f"MMDiTTransformer2DModel.from_pretrained({text!r}).")
    if name is None and _class_name(os.path.join(text, "transformer")) is not None and not kwargs.get("subfolder"):
        raise InputError(f"`from_sd3`: {text} is a pipeline folder; pass subfolder='transformer'.")
    if name is None:
        raise InputError(f"`from_sd3`: {folder} has no readable config.json, so it holds no {SD3_CLASS}.")
    if name != SD3_CLASS:
        raise InputError(f"`from_sd3`: {folder} holds a {name}, not an {SD3_CLASS}.")


def _weights_files(folder: str) -> list[str]:
    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".safetensors"))


def _block_count(keys) -> int:
    indices = [int(m[1]) for k in keys if (m := re.match(r"transformer_blocks\.(\d+)\.", k))]
    return max(indices) + 1 if indices else 0


def pretrained_problem(cls, path, kwargs: dict) -> str | None:
    """Why `cls.from_pretrained(path, **kwargs)` failed, in words; None when the cause is not one of
    these: the folder holds another class (an SD3 transformer: use `from_sd3`), a weights file is damaged, or the
    weights have another depth or other sizes than config.json says."""
    folder = _local_folder(path, kwargs)
    if folder is None or not os.path.isdir(folder):
        return None
    name = _class_name(folder)
    if name is None and os.path.isfile(os.path.join(folder, "model_index.json")):
        return f"{folder} is a pipeline folder; pass subfolder='transformer' to load its transformer."
    if name == SD3_CLASS:
        sub = f", subfolder={kwargs['subfolder']!r}" if kwargs.get("subfolder") else ""
        return (f"{folder} holds a diffusers {SD3_CLASS}, not an {MMDIT_CLASS}: convert it on load with "
                f"MMDiTTransformer2DModel.from_sd3({os.fspath(path)!r}{sub}).")
    if name is not None and name != cls.__name__:
        return f"{folder} holds a {name}, not an {cls.__name__}."
    for file in _weights_files(folder):
        problem = safetensors_problem(file)
        if problem:
            return f"the weights file {file} {problem}."
    return weights_mismatch(cls, folder)


def shape_diff(expected: Mapping[str, tuple], got: Mapping[str, tuple]) -> tuple[list[str], list[str], list[str]]:
    """How the shapes `got` (name -> shape) differ from those `expected`: the names missing, the names unexpected
    and the names of another shape, each sorted."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    reshaped = sorted(key for key in set(expected) & set(got) if tuple(expected[key]) != tuple(got[key]))
    return missing, unexpected, reshaped


def weights_mismatch(cls, folder: str) -> str | None:
    """How the weights in `folder` differ from what its config.json builds: blocks, missing and unexpected tensors,
    shapes (read from the safetensors headers; the model is built on the meta device)."""
    from accelerate import init_empty_weights

    from ..conversion.legacy import legacy_module_name_to_current

    files = _weights_files(folder)
    if not files:
        return None
    shapes = {}
    for file in files:
        shapes.update({legacy_module_name_to_current(k): v for k, v in safetensors_shapes(file).items()})
    try:
        config = cls.load_config(folder)
        with init_empty_weights():
            expected = {k: tuple(v.shape) for k, v in cls.from_config(config).state_dict().items()}
    except (InputError, TypeError, ValueError, OSError):
        return None
    missing, unexpected, resized = shape_diff(expected, shapes)
    if not (missing or unexpected or resized):
        return None
    parts = []
    blocks, depth = _block_count(shapes), config.get("depth")
    if depth is not None and blocks != depth:
        parts.append(f"the weights hold {blocks} blocks (transformer_blocks.0..{blocks - 1}) but config.json says "
                     f"depth={depth}")
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            parts.append(f"{len(keys)} {label} tensor(s) ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
    if resized:
        parts.append(f"{len(resized)} of another shape (e.g. {resized[0]}: weights {shapes[resized[0]]}, config "
                     f"{expected[resized[0]]})")
    return f"the weights in {folder} do not fit its config.json: {'; '.join(parts)}. Use the config.json saved with them."


def check_loading_info(cls, path, kwargs: dict, info: dict) -> None:
    """Weights that loaded only in part (tensors missing or left over) are refused, unless the caller asked for
    that with `ignore_mismatched_sizes=True`."""
    if kwargs.get("ignore_mismatched_sizes"):
        return
    adapter_keys = [key for key in info.get("unexpected_keys") or [] if IP_ADAPTER_KEY.search(key)]
    if adapter_keys:
        logger.warning(f"{os.fspath(path)} holds an IP-Adapter's weights ({len(adapter_keys)} tensors, saved while one "
                       "was loaded); the transformer is loaded without them: `load_ip_adapter` loads an adapter.")
        info = {**info, "unexpected_keys": [key for key in info["unexpected_keys"] if key not in adapter_keys]}
    if not (info.get("missing_keys") or info.get("unexpected_keys") or info.get("mismatched_keys")):
        return
    folder = _local_folder(path, kwargs)
    described = weights_mismatch(cls, folder) if folder and os.path.isdir(folder) else None
    if described is None:
        parts = [f"{len(info[k])} {k.replace('_keys', '')} tensor(s) ({', '.join(map(str, info[k][:3]))})"
                 for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)]
        described = f"the weights of {os.fspath(path)} do not fit their config: {'; '.join(parts)}."
    raise InputError(described + " (Pass ignore_mismatched_sizes=True to load them in part anyway.)")
