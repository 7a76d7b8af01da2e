"""Pushing saved MMDiT folders (pipeline, transformer or LoRA) and live objects to the Hugging Face Hub.

    push_folder(folder, repo_id, revision="v1", card_data={"datasets": ["me/shapes"]})  # a saved folder
    push_to_hub(pipe_or_model, repo_id, private=True)                                # save to a temp dir, then push

Each push creates the repo when needed (`private` applies then), creates the branch `revision` when missing,
uploads the folder's safetensors weights and configs (pickled weights are never uploaded) in one commit together
with the model card (`write_model_card`'s, merged into the repo's existing card) and optional sample images, and
returns the commit: a `huggingface_hub.CommitInfo`, which is a `str` (the commit URL) with `.oid` (the commit sha),
`.pr_url`, ... Hub failures raise `HubError` with a message that says what to do; the token never appears in
messages or logs.

The models' and pipelines' own `push_to_hub` / `save_pretrained(push_to_hub=True)` are diffusers' (no model
card of ours, no branch); these functions are the project's.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Iterable

from .errors import hub_errors
from .model_card import IMAGES_DIR, README, build_model_card, detect_folder_kind, png_bytes

__all__ = ["PICKLE_PATTERNS", "push_folder", "push_to_hub"]

logger = logging.getLogger(__name__)

# Never uploaded: pickled weights ("safetensors only"), caches, VCS and editor leftovers.
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")
ALWAYS_IGNORED = (".git/*", "*/.git/*", ".cache/*", "*/__pycache__/*", "__pycache__/*", "*.pyc", ".DS_Store",
                  "*.incomplete", "*.lock")
_SHA = re.compile(r"[0-9a-f]{40}")


def _matches(path: str, patterns: Iterable[str]) -> bool:
    name = path.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(name, p) for p in patterns)


def _folder_files(folder: Path, ignore_patterns: Iterable[str]) -> tuple[list[str], list[str]]:
    """(files to upload, pickled weight files skipped): POSIX paths relative to `folder`, sorted."""
    upload, pickled = [], []
    ignore = list(ALWAYS_IGNORED) + list(ignore_patterns)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if not _matches(rel, ignore):
            (pickled if _matches(rel, PICKLE_PATTERNS) else upload).append(rel)
    return upload, pickled


def _existing_card(api, repo_id: str, revision: str, folder: Path, tmp: str) -> str | None:
    """The repo's README.md at `revision` (downloaded into `tmp`, not the user's cache), else the folder's.

    (diffusers' `load_or_create_model_card` reads only `main`, into the user's cache, and takes an unreachable Hub
    for a missing card, which would overwrite the owner's text.)"""
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(api.hf_hub_download(repo_id, README, revision=revision, cache_dir=tmp)).read_text(encoding="utf-8")
    except EntryNotFoundError as error:  # no README in the repo yet
        if isinstance(error, LocalEntryNotFoundError):  # the Hub is unreachable: never clobber the card
            raise
    local = folder / README
    return local.read_text(encoding="utf-8") if local.is_file() else None


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    card_data: dict | None = None,
    sample_images: Iterable | None = None,
    ignore_patterns: Iterable[str] | None = None,
    path_in_repo: str | None = None,
    endpoint: str | None = None,
):
    """Push a saved folder to the Hub with its model card; returns the `CommitInfo` (a str: the commit URL;
    `.oid`: the commit sha; `.pr_url` with `create_pr=True`).

    Args:
        folder: A pipeline folder (model_index.json), an `MMDiTTransformer2DModel` folder (config.json) or a LoRA
            folder (`pytorch_lora_weights.safetensors`), as `save_pretrained` / `save_lora_weights` write them.
        repo_id: `namespace/name` (a bare name goes to the token's user namespace). Created if missing.
        revision: The branch to push to (created from main when missing), or `refs/pr/<n>`; default main.
        private: Visibility of a repo created by this push (ignored for an existing repo).
        token: A write token; default: HF_TOKEN or the `hf auth login` token. Never printed or logged.
        commit_message: Default "Upload <class> with mmdit-diffusers".
        create_pr: Open a pull request against `revision` instead of committing to it.
        card_data: Card metadata (`license`, `base_model`, `datasets`, `tags`, any YAML key) and body fields
            (`model_name`, `description`, `training` dict, `scores` dict, `limitations`, `prompt`); see
            `build_model_card`.
        sample_images: `[(prompt, PIL image or image path), ...]`: uploaded as `images/sample_<i>.png`, shown in
            the card and as its `widget`.
        ignore_patterns: More glob patterns of files not to upload (e.g. a training run's `checkpoint-*`, `logs/*`).
        path_in_repo: Upload into this folder of the repo (e.g. a transformer into `transformer/`); the root
            model card is then left as it is.
        endpoint: The Hub URL; default HF_ENDPOINT.

    Raises:
        ValueError: `folder` is not a model, pipeline or LoRA folder, or has no safetensors weights.
        HubError: the Hub refused the push or could not be reached.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    kind = detect_folder_kind(folder)
    if revision is not None and _SHA.fullmatch(revision):
        raise ValueError(f"revision {revision!r} is a commit sha: push to a branch name (e.g. 'main' or 'v1')")
    subfolder = (path_in_repo or "").strip("/")
    files, pickled = _folder_files(folder, ignore_patterns or ())
    if pickled:
        logger.warning("Not uploading pickled weights (safetensors only): %s", ", ".join(pickled))
    if not any(f.endswith(".safetensors") for f in files):
        raise ValueError(
            f"{folder} has no .safetensors weights (only safetensors are pushed): save it with "
            "save_pretrained(..., safe_serialization=True)"
        )

    api = HfApi(endpoint=endpoint, token=token)
    with hub_errors(repo_id, revision=revision, token=token, endpoint=api.endpoint):
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision not in (None, "main") and not revision.startswith("refs/pr/"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        branch = revision or "main"
        operations = [
            CommitOperationAdd(path_in_repo=f"{subfolder}/{rel}" if subfolder else rel,
                               path_or_fileobj=str(folder / rel))
            for rel in files
            if subfolder or rel != README  # the root README is the merged card, added below
        ]
        if not subfolder:
            samples = []
            for i, (prompt, image) in enumerate(sample_images or ()):
                samples.append({"text": str(prompt), "url": f"{IMAGES_DIR}/sample_{i}.png"})
                operations.append(CommitOperationAdd(path_in_repo=samples[-1]["url"], path_or_fileobj=png_bytes(image)))
            with tempfile.TemporaryDirectory(prefix="mmdit-push-card-") as tmp:
                existing = _existing_card(api, repo_id, branch, folder, tmp)
            card = build_model_card(folder, repo_id, existing=existing, card_data=card_data, samples=samples,
                                    kind=kind)
            operations.append(CommitOperationAdd(path_in_repo=README, path_or_fileobj=str(card).encode("utf-8")))
        class_name = {"pipeline": "MMDiTPipeline", "model": "MMDiTTransformer2DModel", "lora": "LoRA weights"}[kind]
        logger.info("Pushing %s %s to %s (revision %s)", kind, folder, repo_id, branch)
        commit = api.create_commit(
            repo_id,
            operations=operations,
            commit_message=commit_message or f"Upload {class_name} with mmdit-diffusers",
            revision=revision,
            create_pr=create_pr,
        )
    logger.info("Pushed %s to %s: %s", kind, repo_id, commit.commit_url)
    return commit


def push_to_hub(
    model_or_pipeline,
    repo_id: str,
    *,
    variant: str | None = None,
    subfolder: str | None = None,
    card_data: dict | None = None,
    **push_kwargs,
):
    """Save an `MMDiTPipeline` or `MMDiTTransformer2DModel` (safetensors) to a temporary folder, removed
    afterwards, and push it with `push_folder` (`push_kwargs`: its keyword arguments).

    `variant` is passed to `save_pretrained`; `subfolder` is the repo folder to upload into (`path_in_repo`). The
    Hub repo the object was loaded from becomes the card's `base_model` unless `card_data` names one."""
    if not callable(getattr(model_or_pipeline, "save_pretrained", None)):
        raise TypeError(f"`model_or_pipeline` must be an MMDiTPipeline or MMDiTTransformer2DModel (anything with "
                        f"save_pretrained); got {type(model_or_pipeline).__name__}.")
    card_data = dict(card_data or {})
    base = _base_model(model_or_pipeline, repo_id)
    if base and "base_model" not in card_data:
        card_data["base_model"] = base
    with tempfile.TemporaryDirectory(prefix="mmdit-push-") as tmp:
        model_or_pipeline.save_pretrained(tmp, safe_serialization=True, **({"variant": variant} if variant else {}))
        return push_folder(tmp, repo_id, card_data=card_data, path_in_repo=subfolder, **push_kwargs)


def _base_model(obj, repo_id: str) -> str | None:
    """The Hub repo `obj` was loaded from, when it is one and not `repo_id` itself."""
    config = getattr(obj, "config", None)
    name = config.get("_name_or_path") if hasattr(config, "get") else None
    if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+/[\w.-]+", name) or os.path.exists(name):
        return None
    if name == repo_id or name.split("/")[-1] == repo_id:
        return None
    return name
