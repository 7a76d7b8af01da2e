"""The built wheel is the package: installed into a fresh virtual environment, with no source checkout in reach,
`mmdit-diffusers generate` finds the shipped pipeline (package data) and writes the same image as the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a red circle left of a blue square"

pytestmark = pytest.mark.slow


def _run(command, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed; the dependencies come from this interpreter's site-packages, added by
    a plain path line (which, unlike site-packages itself, does not run the editable install's .pth hook)."""
    root = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q", "-w",
          str(root / "dist")])
    (wheel,) = (root / "dist").glob("mmdit_diffusers-*.whl")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
          str(wheel)], env=_clean_env())  # PYTHONPATH's checkout would count as installed
    # after the install: with the shared site-packages in view, pip would see the editable install as installed
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (purelib / "shared_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def test_the_wheel_carries_the_shipped_pipeline_and_generates_what_the_checkout_does(wheel_venv, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    where = _run([str(wheel_venv / "bin" / "python"), "-c",
                  "import mmdit_diffusers.shapes.shipped as s; print(s.__file__); print(s.SHIPPED_PIPELINE)"],
                 cwd=outside, env=_clean_env()).stdout.split()
    assert all(Path(p).resolve().is_relative_to(wheel_venv.resolve()) for p in where), where
    assert (Path(where[1]) / "transformer" / "diffusion_pytorch_model.safetensors").is_file()

    installed, checkout = outside / "installed.png", tmp_path / "checkout.png"
    _run([str(wheel_venv / "bin" / "mmdit-diffusers"), "generate", PROMPT, "--seed", "0", "--output", str(installed)],
         cwd=outside, env=_clean_env())
    _run([sys.executable, "-m", "mmdit_diffusers.cli", "generate", PROMPT, "--seed", "0", "--output", str(checkout)],
         cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    a, b = Image.open(installed), Image.open(checkout)
    assert a.size == b.size == (64, 64) and a.tobytes() == b.tobytes()
