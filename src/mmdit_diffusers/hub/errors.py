"""Hub failures as one exception, `HubError`, whose message says what went wrong and what to do about it.

huggingface_hub raises typed errors (`RepositoryNotFoundError`, `RevisionNotFoundError`, `HfHubHTTPError` with
the answer's status code, ...); diffusers and transformers often re-raise them as a plain `OSError` whose
`__cause__` / `__context__` holds the typed one. `hub_errors(repo_id)` finds it and raises the `HubError` that
explains it; other exceptions pass through unchanged. No message carries the token.
"""

from __future__ import annotations

import importlib
import os
import re
from contextlib import contextmanager
from typing import Iterator

__all__ = ["HubError", "hub_errors", "redact", "translate_hub_error"]

LOGIN_HINT = "check your token (--token, HF_TOKEN) or run `hf auth login`"


class HubError(RuntimeError, OSError):
    """A Hub operation (push, pull, card update) failed; `str(error)` says why and what to do.

    It is a `RuntimeError`, and also an `OSError` like the errors that diffusers' and transformers'
    `from_pretrained` raise for missing repos, so existing `except OSError` code keeps working.

    Attributes:
        status: The HTTP status of the Hub's answer (401, 404, ...), or None (network, cache).
        reason: A short machine-readable cause: "auth", "forbidden", "repo_not_found", "revision_not_found",
            "entry_not_found", "conflict", "server", "network", "offline", "http".
    """

    def __init__(self, message: str, *, status: int | None = None, reason: str | None = None):
        super().__init__(message)
        self.status = status
        self.reason = reason

    def __str__(self) -> str:
        return self.args[0] if self.args else ""

    def __reduce__(self):  # picklable with its attributes (multiprocessing, accelerate)
        return (type(self), (str(self),), {"status": self.status, "reason": self.reason})


def redact(text: str, token: str | bool | None = None) -> str:
    """`text` with the given token, the environment's and the stored token replaced by `***`, and any
    `Authorization: Bearer ...` value hidden."""
    from huggingface_hub import get_token

    secrets = [token if isinstance(token, str) else None, os.environ.get("HF_TOKEN"),
               os.environ.get("HUGGING_FACE_HUB_TOKEN"), get_token()]
    for secret in sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return re.sub(r"(?i)(bearer\s+)[^\s'\"]+", r"\1***", text)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and everything it was raised from or while handling, breadth first, each once."""
    seen, queue = set(), [exc]
    while queue:
        current = queue.pop(0)
        if current is not None and id(current) not in seen:
            seen.add(id(current))
            yield current
            queue += [current.__cause__, current.__context__]


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection refused, DNS failure, timeout: the HTTP client's own classes (httpx2 for huggingface_hub
    >= 1.x, requests before) and the builtins."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (("httpx2", ["TransportError"]), ("httpx", ["TransportError"]),
                          ("requests", ["ConnectionError", "Timeout"])):
        try:
            found += [getattr(importlib.import_module(module), name) for name in names]
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def translate_hub_error(
    exc: BaseException,
    repo_id: str,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
    local_files_only: bool = False,
) -> HubError | None:
    """The `HubError` that explains `exc` (or an exception in its cause/context chain), or None when `exc` is
    not a Hub failure."""
    from huggingface_hub import constants
    from huggingface_hub import errors as hf

    hub_types = (HubError, hf.HfHubHTTPError, hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled)
    found = next((e for e in _chain(exc) if isinstance(e, hub_types + _transport_errors())), None)
    if found is None or isinstance(found, HubError):
        return found

    status = getattr(getattr(found, "response", None), "status_code", None)
    server = (getattr(found, "server_message", None) or "").strip().split("\n")[0]
    detail = f" ({server})" if server else ""
    endpoint = endpoint or constants.ENDPOINT
    at = f"revision {revision or 'main'!r}"
    network = ("network", None, f"cannot reach the Hub at {endpoint} (for {repo_id}): check your network or "
               "HF_ENDPOINT")
    not_cached = ("offline", None, f"{repo_id} ({at}) is not in the local cache and local_files_only=True: download "
                  "it first (without local_files_only) or point cache_dir at the cache that has it")
    private = LOGIN_HINT if status == 401 else "make sure your token can read it"
    by_type = [  # (class, (reason, status, message)): the first class that `found` is an instance of decides
        (hf.GatedRepoError, ("forbidden", status, f"repository {repo_id} is gated ({status}): accept its conditions "
                             f"on the Hub with your account, then {LOGIN_HINT}")),
        (hf.RevisionNotFoundError, ("revision_not_found", 404, f"{at} not found in repository {repo_id} (404): check "
                                    "the branch, tag or commit sha (`huggingface_hub.list_repo_refs` lists them)")),
        (hf.RepositoryNotFoundError, ("repo_not_found", status or 404, f"repository {repo_id} not found "
                                      f"({status or 404}): check the name or create it; if it is private, {private}")),
        (hf.OfflineModeIsEnabled, ("offline", None, f"offline mode (HF_HUB_OFFLINE) is on and {repo_id} is not in "
                                   "the local cache: unset HF_HUB_OFFLINE or download it first")),
        # Not in the cache: asked for (local_files_only, HF_HUB_OFFLINE), or else because the Hub is unreachable.
        (hf.LocalEntryNotFoundError, not_cached if local_files_only or constants.HF_HUB_OFFLINE else network),
        (hf.EntryNotFoundError, ("entry_not_found", 404, f"a file the loader needs is not in repository {repo_id} "
                                 f"at {at} (404): is it a saved MMDiT model or pipeline (config.json / "
                                 "model_index.json)? Check the repo and the `subfolder`")),
    ]
    by_status = {  # any other HTTP answer: (reason, message)
        401: ("auth", f"authentication failed (401): {LOGIN_HINT}"),
        403: ("forbidden", f"permission denied (403) on {repo_id}: use a token with write access to that namespace "
                           "(a fine-grained token needs write permission on the repo) or push to your own namespace"),
        409: ("conflict", f"conflict (409) on {repo_id}{detail}: the repo or branch changed meanwhile, or the name is "
                          "taken; pull the latest revision or choose another name/branch, then retry"),
    }
    matched = next((explained for cls, explained in by_type if isinstance(found, cls)), None)
    if matched is None and status is None:  # a transport error: connection refused, DNS, timeout
        matched = network
    elif matched is None:
        reason, message = by_status.get(status) or (
            ("server", f"the Hub at {endpoint} answered {status}: it is having trouble, retry later") if status >= 500
            else ("http", f"the Hub refused the request ({status}){': ' + server if server else ''}")
        )
        matched = (reason, status, message)
    reason, code, message = matched
    return HubError(redact(message, token), status=code, reason=reason)


@contextmanager
def hub_errors(repo_id: str, **context) -> Iterator[None]:
    """Turn Hub failures inside the block into `HubError` (see `translate_hub_error` for `context`)."""
    try:
        yield
    except HubError:
        raise
    except Exception as exc:
        error = translate_hub_error(exc, repo_id, **context)
        if error is None:
            raise
        raise error from exc
