from .sd3 import from_sd3, to_sd3

__all__ = ["from_sd3", "to_sd3"]
