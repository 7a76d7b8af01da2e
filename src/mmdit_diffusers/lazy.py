"""Names of a package resolved on first use (PEP 562), so that importing the package imports nothing heavy.

    __getattr__, __dir__ = lazy_exports(__name__, {"MMDiTPipeline": ".pipeline_mmdit", "ModelMixin": "diffusers"})

A module name starting with "." is relative to the package. The value is cached in the package's namespace.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name], package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
