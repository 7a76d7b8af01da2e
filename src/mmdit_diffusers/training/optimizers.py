"""`--optimizer`: the optimizer of the trained parameters.

    adamw       torch.optim.AdamW (default)
    adamw8bit   bitsandbytes.optim.AdamW8bit: 8-bit optimizer states (~4x less optimizer memory); needs
                `pip install bitsandbytes` and a CUDA GPU (diffusers' scripts: `--use_8bit_adam`)
    prodigy     prodigyopt.Prodigy, which estimates the step size itself: use `--learning_rate 1.0` (the LR
                schedule still multiplies it); needs `pip install prodigyopt` (`pip install mmdit-diffusers[prodigy]`)

All take `--adam_beta1/2`, `--adam_weight_decay` and `--adam_epsilon`; Prodigy also `--prodigy_beta3`,
`--prodigy_decouple`, `--prodigy_use_bias_correction` and `--prodigy_safeguard_warmup` (diffusers' names and
defaults). `check` runs before any model is loaded, so a missing library or device stops the run at once.
Imports torch only in `create`, so the command line's parser (`args`) stays light.
"""

from __future__ import annotations

import importlib.util
import logging

from ..errors import InputError

logger = logging.getLogger("mmdit_diffusers.train")

OPTIMIZERS = ("adamw", "adamw8bit", "prodigy")
_PACKAGES = {"adamw8bit": "bitsandbytes", "prodigy": "prodigyopt"}


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules, or one without a spec
        return False


def check(name: str, device) -> None:
    """`InputError` when `--optimizer name` cannot run here (its library is missing, or its device)."""
    package = _PACKAGES.get(name)
    if package and not _installed(package):
        raise InputError(f"--optimizer {name} needs the `{package}` package, which is not installed: "
                         f"`pip install {package}`, or use --optimizer adamw.")
    if name == "adamw8bit" and device.type != "cuda":
        raise InputError(f"--optimizer adamw8bit needs a CUDA GPU (bitsandbytes' 8-bit optimizer kernels); this run "
                         f"is on {device.type}. Use --optimizer adamw.")


def create(args, params, lr: float, fsdp: bool = False):
    """The `torch.optim.Optimizer` of `params` at learning rate `lr`, as `args.optimizer` says (see `check`)."""
    import torch

    betas = (args.adam_beta1, args.adam_beta2)
    common = dict(lr=lr, betas=betas, weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    if args.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **common)
    if args.optimizer == "prodigy":
        from prodigyopt import Prodigy

        if lr <= 0.1:
            logger.warning(f"--optimizer prodigy with a learning rate of {lr:g}: Prodigy finds the step size itself and "
                           "expects about 1.0 (it multiplies its estimate).")
        return Prodigy(params, beta3=args.prodigy_beta3, decouple=args.prodigy_decouple,
                       use_bias_correction=args.prodigy_use_bias_correction,
                       safeguard_warmup=args.prodigy_safeguard_warmup, fsdp_in_use=fsdp, **common)
    return torch.optim.AdamW(params, **common)
