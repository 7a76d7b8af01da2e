"""Fixtures of the ported diffusers test mixins."""

from diffusers_model_testing import full_determinism  # noqa: F401
