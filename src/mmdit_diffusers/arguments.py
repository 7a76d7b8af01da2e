"""Value types for the command-line parsers (argparse `type=`), one home for every command.

Each raises `argparse.ArgumentTypeError` (or `ValueError` for text that is not a number), which argparse turns into
a usage error naming the option and the value. Their `__name__` is what argparse prints ("invalid positive int
value: '0'"). Numbers are checked here, before any command imports torch, so a bad value exits at once.
"""

from __future__ import annotations

import argparse
import math

# torch.Generator.manual_seed takes [-2**63, 2**64); a training seed is also offset by the epoch number
SEED_MAX = 2**63 - 1


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def seed(text: str) -> int:
    value = int(text)
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"a seed must be an integer from 0 to 2**63 - 1 = {SEED_MAX}, got {text}")
    return value


def finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a probability in [0, 1], got {text}")
    return value


def decay_rate(text: str) -> float:
    """A coefficient in [0, 1): Adam's betas (1 would never forget the first gradient)."""
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


positive_int.__name__ = "positive int"
non_negative_int.__name__ = "non-negative int"
seed.__name__ = "seed"
finite_float.__name__ = "finite number"
positive_float.__name__ = "positive number"
non_negative_float.__name__ = "non-negative number"
probability.__name__ = "probability"
decay_rate.__name__ = "number in [0, 1)"
