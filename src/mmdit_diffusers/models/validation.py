"""What `MMDiTTransformer2DModel` accepts: its configuration and its forward inputs (the folders it loads:
`loading_checks`).

Everything it refuses is an `InputError` (a `ValueError`) that names the option or argument, its value and what
is expected; what is legal but most likely a mistake is a warning.

    check_config(config)                      before any layer is built
    check_inputs(model, ...) -> inputs        each forward: presence, types, dtypes, shapes, batch sizes, mask;
                                              returns the inputs cast where the cast is lossless
    check_flux_inputs(model, ...)             each forward: `img_ids`, `txt_ids`, `guidance` against the config
    warn_if_not_finite(output, inputs)        each forward's end: a non-finite output named by its inputs

Dtypes: a floating input of another dtype than the model computes in is cast when no value can change (float16 or
bfloat16 into a float32 model, anything into float64) and refused otherwise (float32 into bfloat16, float64 into
float32: say `.to(dtype)` if that is meant); under autocast the kernels choose, as PyTorch's. Integer or boolean
latents and text are refused; timesteps may be integers. `encoder_attention_mask` is 1/0 (keep/drop; bool, integer
or float), or additive as other libraries pass it: float 0 for keep and a large negative (<= -10000, or -inf) for
drop. A float mask of zeros only is additive (nothing dropped). Other values are refused. NaN or infinite inputs
that make the output NaN or infinite are warned about.

Position embeddings each check their own options (`POSITION_CHECKS`), so a new `pos_embed_type` adds one function.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable

import torch

from ..errors import InputError
from .attention import QK_NORMS
from .embeddings import token_grid

ADDITIVE_MASK_DROP = -1e4  # an additive mask drops a position at this value or below (BERT's -10000, -inf, ...)


# ----------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------
def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_sincos(cfg: dict) -> None:
    """SD3's 2-D sin-cos table: half the channels per axis, sin and cos each, so `hidden_size` % 4 == 0; the
    positions are scaled for `sample_size`, which the position grid must cover."""
    if cfg["hidden_size"] % 4:
        raise InputError(
            f"`hidden_size`={cfg['hidden_size']} must be a multiple of 4 for pos_embed_type='sincos' (the 2-D sin-cos "
            "table gives each axis half the channels, half of them sines and half cosines)."
        )
    patch = cfg["patch_size"]
    grid = cfg["pos_embed_max_size"] or max(token_grid(cfg["img_tokens"]))
    sample_size = cfg["sample_size"]
    if sample_size is not None:
        if sample_size % patch:
            raise InputError(f"`sample_size`={sample_size} (latent pixels) must be a multiple of patch_size={patch}.")
        if sample_size > grid * patch:
            raise InputError(
                f"`sample_size`={sample_size} latent pixels exceeds the position grid of {grid} patches x patch_size "
                f"{patch} = {grid * patch}, so the model could not run at its own size; raise pos_embed_max_size to "
                f"at least {sample_size // patch} or lower sample_size."
            )


def _check_rope(cfg: dict) -> None:
    """FLUX's rotary positions: each id axis rotates an even number of head features, all of them together."""
    axes, head_dim = cfg["axes_dims_rope"], cfg["hidden_size"] // cfg["num_heads"]
    valid = isinstance(axes, (tuple, list)) and len(axes) > 0 and all(_is_int(d) and d > 0 and d % 2 == 0 for d in axes)
    if not valid or sum(axes) != head_dim:
        raise InputError(
            f"`axes_dims_rope`={axes!r} must be positive even numbers summing to the head dimension hidden_size // "
            f"num_heads = {head_dim} (FLUX.1: (16, 56, 56) for 128)."
        )
    theta = cfg["rope_theta"]
    if isinstance(theta, bool) or not isinstance(theta, numbers.Real) or not (math.isfinite(theta) and theta > 0):
        raise InputError(f"`rope_theta` must be a positive number; got {theta!r}.")


# pos_embed_type -> the check of its options
POSITION_CHECKS: dict[str, Callable[[dict], None]] = {"sincos": _check_sincos, "rope": _check_rope}
POS_EMBED_TYPES = tuple(POSITION_CHECKS)


def check_config(cfg: dict) -> None:
    """Refuse configurations that cannot build or cannot run, naming the option (`cfg`: the constructor's arguments)."""
    for name in ("img_dim", "txt_dim", "img_tokens", "txt_tokens", "hidden_size", "depth", "num_heads", "patch_size"):
        value = cfg[name]
        if not _is_int(value) or value <= 0:
            raise InputError(f"`{name}` must be a positive integer; got {value!r}.")
    single = cfg["num_single_layers"]
    if not _is_int(single) or single < 0:
        raise InputError(f"`num_single_layers` must be a non-negative integer; got {single!r}.")
    for name in ("cond_dim", "in_channels", "out_channels", "sample_size", "pos_embed_max_size"):
        value = cfg[name]
        if value is not None and (not _is_int(value) or value <= 0):
            raise InputError(f"`{name}` must be a positive integer or None; got {value!r}.")
    ratio = cfg["mlp_ratio"]
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not (math.isfinite(ratio) and ratio > 0):
        raise InputError(f"`mlp_ratio` must be a positive number; got {ratio!r}.")
    if int(cfg["hidden_size"] * ratio) < 1:
        raise InputError(
            f"`mlp_ratio`={ratio} gives MLPs of width int(hidden_size * mlp_ratio) = int({cfg['hidden_size']} * "
            f"{ratio}) = 0; it must be at least {1 / cfg['hidden_size']:.3g} (4 is usual)."
        )
    if cfg["hidden_size"] % cfg["num_heads"]:
        raise InputError(f"`hidden_size`={cfg['hidden_size']} is not divisible by `num_heads`={cfg['num_heads']}.")
    p2 = cfg["patch_size"] ** 2
    if cfg["in_channels"] is None and cfg["img_dim"] % p2:
        raise InputError(f"`img_dim`={cfg['img_dim']} is not a multiple of patch_size**2={p2}.")
    if cfg["in_channels"] is not None and cfg["img_dim"] != cfg["in_channels"] * p2:
        raise InputError(
            f"`img_dim`={cfg['img_dim']} must equal in_channels * patch_size**2 = {cfg['in_channels']} * {p2}."
        )
    if cfg["qk_norm"] not in QK_NORMS:
        raise InputError(f"Unknown `qk_norm` {cfg['qk_norm']!r}; expected one of {QK_NORMS}.")
    if cfg["pos_embed_type"] not in POSITION_CHECKS:
        raise InputError(f"Unknown `pos_embed_type` {cfg['pos_embed_type']!r}; expected one of {POS_EMBED_TYPES}.")
    if single and cfg["txt_pre_only_last_block"]:
        raise InputError(
            f"`txt_pre_only_last_block`=True drops the text output of the last double-stream block, which the "
            f"`num_single_layers`={single} single-stream blocks read; set txt_pre_only_last_block=False (as FLUX)."
        )
    layers = cfg["dual_attention_layers"]
    if not isinstance(layers, (list, tuple)):
        raise InputError(f"`dual_attention_layers` must be a tuple of block indices; got {layers!r}.")
    bad = [i for i in layers if not _is_int(i) or not 0 <= i < cfg["depth"]]
    if bad:
        raise InputError(f"`dual_attention_layers` {bad} out of range for depth={cfg['depth']} (valid: 0..{cfg['depth'] - 1}).")
    grid = token_grid(cfg["img_tokens"])
    if cfg["pos_embed_max_size"] is not None and max(grid) > cfg["pos_embed_max_size"]:
        raise InputError(
            f"`img_tokens`={cfg['img_tokens']} is read on a {grid[0]} x {grid[1]} grid, larger than "
            f"`pos_embed_max_size`={cfg['pos_embed_max_size']}."
        )
    POSITION_CHECKS[cfg["pos_embed_type"]](cfg)


# ----------------------------------------------------------------------------------------------------------
# Forward inputs
# ----------------------------------------------------------------------------------------------------------
def compute_dtype(model) -> torch.dtype:
    """The dtype the model's first projection computes in (diffusers' layerwise casting: its compute dtype)."""
    layer = model.x_embedder
    registry = getattr(layer, "_diffusers_hook", None)
    casting = registry.get_hook("layerwise_casting") if registry is not None else None
    return casting.compute_dtype if casting is not None else layer.weight.dtype


def _lossless(source: torch.dtype, target: torch.dtype) -> bool:
    """Whether every `source` value is exactly a `target` value (both floating point)."""
    s, t = torch.finfo(source), torch.finfo(target)
    return s.bits < t.bits and s.max <= t.max and s.eps >= t.eps and s.tiny >= t.tiny


def _expected(model, name: str) -> str:
    """What the forward input `name` must be, for its error messages (built only when one is raised: the
    f-strings cost a `tiny` forward ~1% of its time)."""
    cfg = model.config
    return {
        "hidden_states": f"latents [B, {model.in_channels}, H, W] or tokens [B, {cfg.img_tokens}, {cfg.img_dim}]",
        "encoder_hidden_states": f"text tokens [B, L, txt_dim={cfg.txt_dim}]",
        "pooled_projections": f"the pooled text [B, cond_dim={model.cond_dim}]",
        "encoder_attention_mask": "[B, L]: 1 keep, 0 drop",
    }[name]


def _tensor(model, name: str, value) -> torch.Tensor:
    if value is None:
        raise InputError(f"`{name}` is required: {_expected(model, name)}.")
    if not isinstance(value, torch.Tensor):
        hint = " (numpy: torch.from_numpy(x))" if type(value).__module__ == "numpy" else ""
        raise InputError(f"`{name}` must be a torch.Tensor {_expected(model, name)}{hint}; got {type(value).__name__}.")
    return value


def _in_compute_dtype(name: str, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if not value.is_floating_point():
        raise InputError(f"`{name}` is {value.dtype}; it must be floating point (the model computes in {dtype}).")
    if value.dtype == dtype or not dtype.is_floating_point or torch.is_autocast_enabled(value.device.type):
        return value
    if _lossless(value.dtype, dtype):
        return value.to(dtype)
    raise InputError(
        f"`{name}` is {value.dtype} but the model computes in {dtype}; the cast would change values, so it is not "
        f"made silently: pass `{name}.to({dtype})` (or cast the model with `model.to({value.dtype})`)."
    )


def _timestep(value, batch: int, device, name: str = "timestep") -> torch.Tensor:
    """A number, a list or array of numbers, or a tensor -> float [B] (a scalar is repeated)."""
    if isinstance(value, torch.Tensor):
        timestep = value
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        timestep = torch.tensor(float(value))
    elif isinstance(value, (list, tuple)) and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value):
        timestep = torch.tensor([float(v) for v in value])
    elif type(value).__module__ == "numpy" and getattr(value, "dtype", None) is not None and value.dtype.kind in "iuf":
        timestep = torch.as_tensor(value)
    else:
        what = "in [0, 1000] (sigma * 1000)" if name == "timestep" else "(the guidance scale)"
        raise InputError(f"`{name}` must be a number or a tensor of numbers {what}, [B] or a scalar; got {value!r} "
                         f"({type(value).__name__}).")
    if timestep.dtype == torch.bool or timestep.is_complex():
        raise InputError(f"`{name}` is {timestep.dtype}; expected real numbers.")
    timestep = timestep.to(device=device, dtype=torch.float32 if not timestep.is_floating_point() else timestep.dtype)
    if timestep.ndim == 0:
        timestep = timestep.expand(batch)
    if timestep.ndim != 1:
        raise InputError(f"`{name}` has shape {tuple(timestep.shape)}; expected [B] or a scalar.")
    return timestep


def _keep_mask(mask: torch.Tensor, device) -> torch.Tensor:
    """1/0 (any dtype) or additive (float 0 / <= -10000) -> bool, True where a token takes part."""
    mask = mask.to(device)
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        if bool(((mask != 0) & (mask != 1)).any()):
            raise InputError(f"`encoder_attention_mask` holds {_first_other(mask, (0, 1))}; expected 1 (keep) and 0 "
                             "(drop).")
        return mask != 0
    binary = (mask == 0) | (mask == 1)
    if bool(binary.all()) and bool((mask == 1).any()):
        return mask == 1
    additive = (mask == 0) | (mask <= ADDITIVE_MASK_DROP)
    if bool(additive.all()):
        return mask == 0
    raise InputError(
        f"`encoder_attention_mask` holds {_first_other(mask, (0, 1))}; expected 1/0 (keep/drop) or an additive mask "
        f"of 0 (keep) and large negatives (<= {ADDITIVE_MASK_DROP:g}, or -inf: drop). Soft biases are not supported."
    )


def _first_other(mask: torch.Tensor, allowed) -> str:
    other = mask[~torch.isin(mask, torch.tensor(allowed, dtype=mask.dtype, device=mask.device))]
    other = other[other > ADDITIVE_MASK_DROP] if mask.is_floating_point() else other
    return repr(other.flatten()[0].item()) if other.numel() else "other values"


def warn_if_not_finite(output: torch.Tensor, named: dict[str, torch.Tensor]) -> None:
    """Where `output` holds NaN or infinities: one warning naming the inputs in `named` that hold them."""
    if torch.compiler.is_compiling():
        return
    # a finite float32 sum proves every element finite, so a finite forward pays one sum of its output (checking the
    # inputs first took ~0.25 ms of a `tiny` forward's ~4 ms, mostly summing the [B, L, 4096] text); only an output
    # whose sum is not finite (a NaN or infinity, or an overflow) pays the inputs' elementwise tests
    if math.isfinite(output.sum(dtype=torch.float32).item()):  # one device sync (a third of `isfinite`'s time)
        return
    flags = torch.stack([~torch.isfinite(t).all() for t in named.values()]).tolist()
    bad = [name for name, flag in zip(named, flags) if flag]
    if bad:
        warnings.warn(f"{', '.join(f'`{n}`' for n in bad)} hold{'s' if len(bad) == 1 else ''} NaN or infinite values; "
                      "the model's output is not finite either.", RuntimeWarning, stacklevel=2)


def check_inputs(model, hidden_states, encoder_hidden_states, pooled_projections, timestep, mask, img_ids=None):
    """Check the forward inputs of `model` and return `(hidden_states, encoder_hidden_states, pooled_projections,
    timestep [B], mask)`: the floats in the model's compute dtype (where lossless), the mask as bool or None.
    (`img_ids` given to a rotary model lets tokens come in any number; `check_flux_inputs` checks them.)"""
    cfg = model.config
    hidden_states = _tensor(model, "hidden_states", hidden_states)
    encoder_hidden_states = _tensor(model, "encoder_hidden_states", encoder_hidden_states)
    pooled_projections = _tensor(model, "pooled_projections", pooled_projections)
    if timestep is None:
        raise InputError("`timestep` is required: [B] or a scalar in [0, 1000] (sigma * 1000).")
    if hidden_states.ndim == 4:
        _, c, h, w = hidden_states.shape
        if c != model.in_channels:
            raise InputError(f"`hidden_states` has {c} channels; expected in_channels={model.in_channels} ([B, C, H, W]).")
        p = cfg.patch_size
        limit = None if model.pos_grid_size is None else model.pos_grid_size * p
        for name, size in (("height", h), ("width", w)):
            if size < p or size % p:
                raise InputError(f"`hidden_states` {name} {size} is not a positive multiple of patch_size={p}.")
            if limit is not None and size > limit:
                raise InputError(
                    f"`hidden_states` {name} {size} exceeds the position grid: at most pos_embed_max_size * "
                    f"patch_size = {limit}."
                )
    elif hidden_states.ndim == 3 and img_ids is not None and cfg.pos_embed_type == "rope":
        if hidden_states.shape[2] != cfg.img_dim or hidden_states.shape[1] == 0:
            raise InputError(
                f"`hidden_states` tokens have shape {tuple(hidden_states.shape)}; expected [B, N > 0, img_dim={cfg.img_dim}]."
            )
    elif hidden_states.ndim == 3:
        if tuple(hidden_states.shape[1:]) != (cfg.img_tokens, cfg.img_dim):
            raise InputError(
                f"`hidden_states` tokens have shape {tuple(hidden_states.shape)}; expected "
                f"[B, img_tokens={cfg.img_tokens}, img_dim={cfg.img_dim}]."
            )
    else:
        raise InputError(
            f"`hidden_states` must be latents [B, C, H, W] or tokens [B, img_tokens, img_dim]; got shape "
            f"{tuple(hidden_states.shape)}."
        )
    batch = hidden_states.shape[0]
    if batch == 0:
        raise InputError("`hidden_states` holds a batch of 0 samples; pass at least one.")
    if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != cfg.txt_dim:
        raise InputError(
            f"`encoder_hidden_states` has shape {tuple(encoder_hidden_states.shape)}; expected [B, L, txt_dim={cfg.txt_dim}]."
        )
    if encoder_hidden_states.shape[1] > cfg.txt_tokens:
        raise InputError(
            f"`encoder_hidden_states` has {encoder_hidden_states.shape[1]} tokens; the model accepts at most "
            f"txt_tokens={cfg.txt_tokens}."
        )
    if pooled_projections.ndim != 2 or pooled_projections.shape[-1] != model.cond_dim:
        raise InputError(
            f"`pooled_projections` has shape {tuple(pooled_projections.shape)}; expected [B, cond_dim={model.cond_dim}]."
        )
    timestep = _timestep(timestep, batch, hidden_states.device)
    sizes = {
        "hidden_states": batch,
        "encoder_hidden_states": encoder_hidden_states.shape[0],
        "pooled_projections": pooled_projections.shape[0],
        "timestep": timestep.shape[0],
    }
    if len(set(sizes.values())) != 1:
        raise InputError(f"Batch sizes disagree: {sizes}.")
    if mask is not None:
        mask = _tensor(model, "encoder_attention_mask", mask)
        expected = tuple(encoder_hidden_states.shape[:2])
        if tuple(mask.shape) != expected:
            raise InputError(
                f"`encoder_attention_mask` has shape {tuple(mask.shape)}; expected [B, L] = {list(expected)}."
            )
        if not torch.compiler.is_compiling():
            mask = _keep_mask(mask, hidden_states.device)
        else:
            mask = mask.to(device=hidden_states.device) > 0
    dtype = compute_dtype(model)
    hidden_states = _in_compute_dtype("hidden_states", hidden_states, dtype)
    encoder_hidden_states = _in_compute_dtype("encoder_hidden_states", encoder_hidden_states, dtype)
    pooled_projections = _in_compute_dtype("pooled_projections", pooled_projections, dtype)
    return hidden_states, encoder_hidden_states, pooled_projections, timestep, mask


def check_flux_inputs(model, hidden_states, encoder_hidden_states, img_ids, txt_ids, guidance):
    """The FLUX-style inputs against the config; returns (img_ids, txt_ids, guidance [B]) on the input's device
    (ids as float), None where not given. `img_ids` / `txt_ids` only for `pos_embed_type="rope"`; `guidance` exactly
    when the model has a guidance embedding."""
    cfg = model.config
    device = hidden_states.device
    if cfg.pos_embed_type != "rope":
        for name, value in (("img_ids", img_ids), ("txt_ids", txt_ids)):
            if value is not None:
                raise InputError(
                    f"`{name}` is read by models with pos_embed_type='rope' (rotary positions); this model has "
                    f"pos_embed_type={cfg.pos_embed_type!r}. Leave it out."
                )
    else:
        axes = len(cfg.axes_dims_rope)
        if hidden_states.ndim == 4:
            p = cfg.patch_size
            num_img = (hidden_states.shape[2] // p) * (hidden_states.shape[3] // p)
        else:
            num_img = hidden_states.shape[1]
        expected = {"img_ids": (num_img, "image tokens"), "txt_ids": (encoder_hidden_states.shape[1], "text tokens")}
        ids = {"img_ids": img_ids, "txt_ids": txt_ids}
        for name, value in ids.items():
            if value is None:
                continue
            count, what = expected[name]
            if not isinstance(value, torch.Tensor) or value.ndim != 2 or tuple(value.shape) != (count, axes):
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise InputError(
                    f"`{name}` has shape {shape}; expected [{count}, {axes}]: one id of len(axes_dims_rope)={axes} "
                    f"numbers for each of the {count} {what} (the same for every sample, as diffusers' FLUX)."
                )
            ids[name] = value.to(device=device, dtype=torch.float32)
        img_ids, txt_ids = ids["img_ids"], ids["txt_ids"]
    if cfg.guidance_embeds:
        if guidance is None:
            raise InputError(
                "`guidance` is required: this model has a guidance embedding (guidance_embeds=True, as FLUX.1 "
                "[dev]); pass the guidance scale, e.g. guidance=torch.full([batch], 3.5)."
            )
        batch = hidden_states.shape[0]
        guidance = _timestep(guidance, batch, device, name="guidance")
        if tuple(guidance.shape) != (batch,):
            raise InputError(f"`guidance` has shape {tuple(guidance.shape)}; expected [B] = [{batch}] or a scalar.")
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(guidance).all()):
            warnings.warn("`guidance` holds NaN or infinite values; the model's output will not be finite either.",
                          RuntimeWarning, stacklevel=3)
    elif guidance is not None:
        raise InputError(
            "`guidance` was given, but this model has no guidance embedding (guidance_embeds=False, as FLUX.1 "
            "[schnell]); leave it out."
        )
    return img_ids, txt_ids, guidance
