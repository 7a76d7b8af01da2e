"""Loading from the Hub with failures that say what to do.

    pipe = from_pretrained(MMDiTPipeline, "me/my-mmdit", revision="v1")

diffusers' `from_pretrained` reports a missing repo, a wrong token or an unreachable Hub as a generic `OSError`;
`from_pretrained` here raises `HubError` instead (see `errors.py`). Local folders load as they are.
"""

from __future__ import annotations

import os

from .errors import hub_errors

__all__ = ["from_pretrained"]


def from_pretrained(cls, repo_or_path, **kwargs):
    """`cls.from_pretrained(repo_or_path, **kwargs)` (any diffusers model or pipeline class), with Hub failures
    (401, missing repo or revision, Hub unreachable, not cached with `local_files_only`) raised as `HubError`."""
    if isinstance(repo_or_path, (str, os.PathLike)) and os.path.isdir(repo_or_path):
        return cls.from_pretrained(repo_or_path, **kwargs)
    context = {key: kwargs.get(key) for key in ("revision", "token")}
    with hub_errors(str(repo_or_path), local_files_only=bool(kwargs.get("local_files_only")), **context):
        return cls.from_pretrained(repo_or_path, **kwargs)
