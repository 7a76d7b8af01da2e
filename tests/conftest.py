"""Test-wide environment. It must run before anything imports huggingface_hub (diffusers does):
`HF_ENDPOINT` and `HF_HOME` are read once, when `huggingface_hub.constants` is first imported.

The endpoint points at a port on 127.0.0.1 chosen here; the Hub tests start their own
Hub-compatible server on it (tests/hub_server.py). Nothing in the suite can reach huggingface.co.
"""

import os
import socket
import tempfile


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HUB_PORT = free_port()
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


@pytest.fixture(scope="module")
def pipe():
    """The tiny SD3-layout MMDiTPipeline with a text mask (tests/tiny_pipeline.py), one per test module."""
    from tiny_pipeline import tiny_mmdit_pipeline

    pipe = tiny_mmdit_pipeline(seed=0, layout="sd3", masked=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> str:
    """That pipeline saved to a folder: the base model of the training tests (a test module may override it)."""
    from tiny_pipeline import tiny_mmdit_pipeline

    path = tmp_path_factory.mktemp("base") / "pipeline"
    tiny_mmdit_pipeline(seed=0, layout="sd3", masked=True).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    """Eight captioned images in a folder (tests/tiny_pipeline.py's `write_dataset`); modules needing other data
    override it."""
    from tiny_pipeline import write_dataset

    return write_dataset(tmp_path_factory.mktemp("data") / "images", n=8)
