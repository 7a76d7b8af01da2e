"""Pytest fixtures for tests that talk to the local Hub server (tests/hub_server.py).

Import the fixtures by name in a test module:

    from hub_fixtures import hub_repo_id, hub_server  # noqa: F401

`hub_server` runs one server on `conftest.HUB_PORT`, where `HF_ENDPOINT` points, so the default `HfApi()`,
`hf_hub_download` and `from_pretrained`/`push_to_hub` reach it. The token in `HF_TOKEN` belongs to `HUB_USER`.
Repos persist for the whole session: use `hub_repo_id` for a fresh, unique repo name per test.
"""

import os
import re
import time
import uuid

import pytest
from conftest import HUB_PORT
from hub_server import HubServer

HUB_USER = "test-user"
HUB_TOKEN = os.environ["HF_TOKEN"]  # set by conftest; the client sends it by default
OTHER_USER = "other-user"
OTHER_TOKEN = "hf_other_user_token_not_secret"  # a second account, for access-control tests

_SERVER = HubServer(HUB_PORT, tokens={HUB_TOKEN: HUB_USER, OTHER_TOKEN: OTHER_USER})
_users = 0


@pytest.fixture(scope="session")
def hub_server() -> HubServer:
    """The running Hub server (session scoped).

    Each test module that imports this fixture gets its own session-scoped instance of it (pytest registers
    imported fixtures per module), so the instances share one server and the last one to finish stops it.
    """
    global _users
    if _users == 0:
        _SERVER.start()
    _users += 1
    yield _SERVER
    _users -= 1
    if _users == 0:
        _SERVER.stop()


@pytest.fixture
def hub_repo_id(request, hub_server) -> str:
    """A repo id in `HUB_USER`'s namespace that no other test uses (the repo is not created)."""
    name = re.sub(r"[^\w.-]+", "-", request.node.name)[:80]
    return f"{HUB_USER}/{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def no_retry_waits(monkeypatch):
    """The client retries refused connections with back-off sleeps (~23 s): skip the waits."""
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
