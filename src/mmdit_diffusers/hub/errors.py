"""Hub failures as one exception, `HubError`, whose message says what went wrong and what to do about it.

`huggingface_hub`, diffusers and transformers report the same failure in many ways (a `RepositoryNotFoundError`,
an `OSError` that hides it in `__context__`, a bare `httpx` `ConnectError` ...). `hub_errors(...)` turns every
one of them into a `HubError`; other exceptions pass through unchanged. No message carries the token.
"""

from __future__ import annotations

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


def _known_tokens(token: str | bool | None = None) -> list[str]:
    tokens = [token] if isinstance(token, str) and token else []
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if os.environ.get(name):
            tokens.append(os.environ[name])
    try:
        from huggingface_hub import get_token

        stored = get_token()
        if stored:
            tokens.append(stored)
    except Exception:  # pragma: no cover - never let redaction fail
        pass
    return [t for t in tokens if len(t) >= 4]


def redact(text: str, token: str | bool | None = None) -> str:
    """`text` with the given token, the environment's and the stored token replaced by `***`, and any
    `Authorization: Bearer ...` value hidden."""
    for secret in sorted(set(_known_tokens(token)), key=len, reverse=True):
        text = text.replace(secret, "***")
    return re.sub(r"(?i)(bearer\s+)[^\s'\"]+", r"\1***", text)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and everything it was raised from or while handling, breadth first, each once."""
    seen, queue = set(), [exc]
    while queue:
        current = queue.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        queue += [current.__cause__, current.__context__]


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _server_message(exc: BaseException) -> str:
    message = getattr(exc, "server_message", None) or ""
    return message.strip().splitlines()[0] if message.strip() else ""


def _is_network_error(exc: BaseException) -> bool:
    try:
        import httpx2 as httpx  # what huggingface_hub >= 1.x uses (httpx fork)
    except ImportError:  # pragma: no cover
        try:
            import httpx
        except ImportError:
            httpx = None
    transport = (httpx.TransportError,) if httpx is not None else ()
    try:
        import requests

        transport += (requests.ConnectionError, requests.Timeout)
    except ImportError:  # pragma: no cover
        pass
    return isinstance(exc, (*transport, ConnectionError, TimeoutError))


def _endpoint(endpoint: str | None) -> str:
    if endpoint:
        return endpoint
    from huggingface_hub import constants

    return constants.ENDPOINT


def _network_error(repo_id: str, endpoint: str | None) -> HubError:
    return HubError(
        f"cannot reach the Hub at {_endpoint(endpoint)} (for {repo_id}): check your network or HF_ENDPOINT",
        reason="network",
    )


def translate_hub_error(
    exc: BaseException,
    repo_id: str,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
    local_files_only: bool = False,
    filename: str | None = None,
) -> HubError | None:
    """The `HubError` that explains `exc` (or an exception in its cause/context chain), or None when `exc` is
    not a Hub failure."""
    from huggingface_hub import errors as hf_errors

    revision_text = revision or "main"
    found = None
    for candidate in _chain(exc):
        if isinstance(candidate, HubError):
            return candidate
        if isinstance(candidate, (hf_errors.HfHubHTTPError, hf_errors.LocalEntryNotFoundError,
                                  hf_errors.OfflineModeIsEnabled)) or _is_network_error(candidate):
            found = candidate
            break
    if found is None:
        return None

    status = _status(found)
    server = _server_message(found)
    if isinstance(found, hf_errors.GatedRepoError):
        message = (f"repository {repo_id} is gated ({status}): accept its conditions on the Hub with your account, "
                   f"then {LOGIN_HINT}")
        error = HubError(message, status=status, reason="forbidden")
    elif isinstance(found, hf_errors.RevisionNotFoundError):
        error = HubError(
            f"revision {revision_text!r} not found in repository {repo_id} (404): check the branch, tag or "
            "commit sha (`huggingface_hub.list_repo_refs` lists them)",
            status=404, reason="revision_not_found",
        )
    elif isinstance(found, hf_errors.RepositoryNotFoundError):
        message = f"repository {repo_id} not found ({status or 404}): check the name or create it"
        if status == 401:
            message += f"; if it is private, {LOGIN_HINT}"
        else:
            message += "; if it is private, make sure your token can read it"
        error = HubError(message, status=status or 404, reason="repo_not_found")
    elif isinstance(found, hf_errors.OfflineModeIsEnabled):
        error = HubError(
            f"offline mode (HF_HUB_OFFLINE) is on and {repo_id} is not in the local cache: unset HF_HUB_OFFLINE "
            "or download it first",
            reason="offline",
        )
    elif local_files_only and isinstance(found, hf_errors.LocalEntryNotFoundError):
        error = HubError(
            f"{repo_id} (revision {revision_text!r}) is not in the local cache and local_files_only=True: "
            "download it first (without local_files_only) or point cache_dir at the cache that has it",
            reason="offline",
        )
    elif isinstance(found, hf_errors.LocalEntryNotFoundError):  # network down and not cached
        error = _network_error(repo_id, endpoint)
    elif isinstance(found, hf_errors.EntryNotFoundError) or (
        isinstance(found, hf_errors.HfHubHTTPError) and status == 404 and "entry" in server.lower()
    ):
        what = f"file {filename!r}" if filename else "a file the loader needs"
        error = HubError(
            f"{what} not found in repository {repo_id} at revision {revision_text!r} (404): is it a saved "
            "MMDiT model or pipeline (config.json / model_index.json)? Check the repo and the `subfolder`",
            status=404, reason="entry_not_found",
        )
    elif isinstance(found, hf_errors.HfHubHTTPError) and status is not None:
        if status == 401:
            error = HubError(f"authentication failed (401): {LOGIN_HINT}", status=401, reason="auth")
        elif status == 403:
            error = HubError(
                f"permission denied (403) on {repo_id}: use a token with write access to that namespace "
                "(a fine-grained token needs write permission on the repo) or push to your own namespace",
                status=403, reason="forbidden",
            )
        elif status == 409:
            detail = f" ({server})" if server else ""
            error = HubError(
                f"conflict (409) on {repo_id}{detail}: the repo or branch changed meanwhile, or the name is taken; "
                "pull the latest revision or choose another name/branch, then retry",
                status=409, reason="conflict",
            )
        elif status >= 500:
            error = HubError(
                f"the Hub at {_endpoint(endpoint)} answered {status}: it is having trouble, retry later",
                status=status, reason="server",
            )
        else:
            detail = f": {server}" if server else ""
            error = HubError(f"the Hub refused the request ({status}){detail}", status=status, reason="http")
    else:  # a transport error: connection refused, DNS, timeout
        error = _network_error(repo_id, endpoint)
    error.args = (redact(error.args[0], token),)
    return error


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
