"""`MMDiTHubMixin`: the Hub methods of `MMDiTTransformer2DModel` and `MMDiTPipeline`.

Put it first among the bases so that its methods come before diffusers' `PushToHubMixin` / `from_pretrained`:

    class MMDiTTransformer2DModel(MMDiTHubMixin, ModelMixin, ConfigMixin, PeftAdapterMixin): ...
    class MMDiTPipeline(MMDiTHubMixin, DiffusionPipeline, MMDiTLoraLoaderMixin): ...

- `push_to_hub(repo_id, ..., revision=None, card_data=None, sample_images=None)`: diffusers' signature plus
  `revision` (a branch, created when missing), with our model card (merged into an existing one), safetensors
  only, and `HubError` for Hub failures. Returns the `CommitInfo` (a str: the commit URL; `.oid`: its sha).
- `save_pretrained(..., push_to_hub=True)` pushes through the same path (diffusers' `_upload_folder` hook).
- `from_pretrained(repo_id, revision=..., subfolder=..., cache_dir=..., local_files_only=...)`: diffusers' loader;
  a Hub failure (401, missing repo or revision, Hub unreachable, not cached offline) raises `HubError` that says
  what to do, instead of diffusers' generic `OSError`. Local folders are not affected.

The mixin defines no state and no `__init__`; it only adds these methods.
"""

from __future__ import annotations

import os
from typing import Iterable

from .errors import hub_errors
from .push import push_pipeline_folder, push_to_hub

__all__ = ["MMDiTHubMixin", "from_pretrained_with_hub_errors", "register_with_diffusers"]

PACKAGE = "mmdit_diffusers"


def register_with_diffusers() -> None:
    """Let diffusers download pipelines whose model_index.json names our package root (`["mmdit_diffusers",
    "MMDiTTransformer2DModel"]`) from the Hub.

    `DiffusionPipeline.download` accepts a component library only when it is in diffusers' `LOADABLE_CLASSES`
    (or is a diffusers pipeline module, or ships `<component>/<library>.py` as remote code); otherwise it raises
    "transformer/mmdit_diffusers.py ... does not exist". Local folders skip that check, so only Hub repos fail.
    Registering the package (its root exports `ModelMixin`) fixes that; idempotent.
    """
    from diffusers.pipelines import pipeline_loading_utils

    pipeline_loading_utils.LOADABLE_CLASSES.setdefault(
        PACKAGE, {"ModelMixin": ["save_pretrained", "from_pretrained"]}
    )


register_with_diffusers()  # at import, so loading does not depend on what ran before


def _is_local(path) -> bool:
    return isinstance(path, (str, os.PathLike)) and os.path.isdir(path)


class MMDiTHubMixin:
    """Hub support for our models and pipelines (see the module docstring)."""

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        safe_serialization: bool = True,
        variant: str | None = None,
        subfolder: str | None = None,
        revision: str | None = None,
        card_data: dict | None = None,
        sample_images: Iterable | None = None,
    ):
        """Upload to the Hub with a model card; see `mmdit_diffusers.hub.push_to_hub`.

        Args:
            repo_id: `namespace/name`; created when missing (`private` applies then).
            commit_message, private, token, create_pr, variant, subfolder: as diffusers' `push_to_hub`.
            safe_serialization: Must be True: only safetensors weights are pushed.
            revision: The branch to commit to (created from main when missing); default main.
            card_data: Model card metadata and body fields (`license`, `base_model`, `datasets`, `training`,
                `scores`, ...).
            sample_images: `[(prompt, PIL image or path), ...]` for the card and its widget.
        """
        return push_to_hub(
            self, repo_id, commit_message=commit_message, private=private, token=token, create_pr=create_pr,
            safe_serialization=safe_serialization, variant=variant, subfolder=subfolder, revision=revision,
            card_data=card_data, sample_images=sample_images,
        )

    def _upload_folder(self, working_dir, repo_id, token=None, commit_message=None, create_pr=False, subfolder=None):
        """diffusers' `save_pretrained(..., push_to_hub=True)` hook: push the saved folder with our card."""
        return push_pipeline_folder(
            working_dir, repo_id, token=token, commit_message=commit_message, create_pr=create_pr,
            path_in_repo=subfolder,
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        return from_pretrained_with_hub_errors(
            super().from_pretrained, pretrained_model_name_or_path, **kwargs
        )


def from_pretrained_with_hub_errors(load, pretrained_model_name_or_path, **kwargs):
    """`load(pretrained_model_name_or_path, **kwargs)` (a `from_pretrained`), with Hub failures raised as `HubError`.

    Usable on any class: `from_pretrained_with_hub_errors(MMDiTPipeline.from_pretrained, "user/repo")`."""
    if _is_local(pretrained_model_name_or_path):
        return load(pretrained_model_name_or_path, **kwargs)
    from huggingface_hub import constants

    register_with_diffusers()

    context = {
        "revision": kwargs.get("revision"),
        "token": kwargs.get("token"),
        "local_files_only": bool(kwargs.get("local_files_only")) or constants.HF_HUB_OFFLINE,
    }
    with hub_errors(str(pretrained_model_name_or_path), **context):
        return load(pretrained_model_name_or_path, **kwargs)
