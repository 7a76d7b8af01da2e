"""Test-wide environment. It must run before anything imports huggingface_hub (diffusers does):
`HF_ENDPOINT` and `HF_HOME` are read once, when `huggingface_hub.constants` is first imported.

The endpoint points at a port on 127.0.0.1 chosen here; the Hub tests start their own
Hub-compatible server on it (tests/hub_server.py). Nothing in the suite can reach huggingface.co.
"""

import os
import socket
import tempfile


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HUB_PORT = _free_port()
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{HUB_PORT}"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="mmdit-test-hf-home-")
os.environ["HF_TOKEN"] = "hf_test_token_not_secret"
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ.pop("HF_HUB_OFFLINE", None)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite's models are tiny: one thread per process is several times faster than two on 2 cores
# (thread hand-off costs more than the matmuls), and subprocess tests inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")


import pytest  # noqa: E402  (after the environment above, before anything imports huggingface_hub)


@pytest.fixture
def fresh_accelerate():
    """Each in-process training run starts from a fresh accelerate state (it is a process-wide singleton)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
