"""Value types for the command-line parsers (argparse `type=`), one home for every command.

Each raises `argparse.ArgumentTypeError`, which argparse turns into a usage error naming the option and the value.
Their `__name__` is what argparse prints ("invalid positive int value: '0'").
"""

from __future__ import annotations

import argparse
import math


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


def positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a probability in [0, 1], got {text}")
    return value


positive_int.__name__ = "positive int"
non_negative_int.__name__ = "non-negative int"
positive_float.__name__ = "positive number"
probability.__name__ = "probability"
