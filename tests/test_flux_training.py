"""`mmdit-diffusers train` on FLUX.1: a FLUX-style config trained from scratch, exported, loaded with
`MMDiTPipeline.from_pretrained` and generating; a LoRA on a diffusers-format FLUX.1 folder; the guidance embedding fed
`--guidance_scale`; a kill -9 in the middle of a FLUX-style run, resumed, ends at the uninterrupted run's weights.

The base folder is a tiny random FLUX.1 pipeline saved by diffusers' `FluxPipeline` (tests/tiny_flux.py).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from peft import LoraConfig, set_peft_model_state_dict
from safetensors.torch import load_file

from mmdit_diffusers import MMDiTFluxPipeline, MMDiTPipeline, MMDiTTransformer2DModel
from mmdit_diffusers.training.args import DEFAULT_LORA_LAYERS
from tiny_flux import save_tiny_flux_pipeline
from tiny_pipeline import write_dataset

pytestmark = pytest.mark.usefixtures("fresh_accelerate")

# a tiny FLUX-style transformer: one double-stream and one single-stream block (which reads the double-stream block's
# text output), rotary positions (head dim 16 = 4 + 6 + 6), FLUX.1 [dev]'s guidance embedding
FLUX_STYLE = {"preset": "tiny", "depth": 1, "num_single_layers": 1, "txt_pre_only_last_block": False,
              "pos_embed_type": "rope", "axes_dims_rope": [4, 6, 6], "guidance_embeds": True}


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory) -> str:
    return save_tiny_flux_pipeline(tmp_path_factory.mktemp("flux") / "pipeline", guidance_embeds=True)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return write_dataset(tmp_path_factory.mktemp("data") / "images", n=4)


def common(base: str, data: str, out, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", base, "--train_data_dir", data, "--output_dir", str(out),
        "--resolution", "32", "--train_batch_size", "2", "--max_sequence_length", "8", "--seed", "0",
        "--report_to", "none", "--checkpointing_steps", "1000", *extra,
    ]


def train_command(argv: list[str]) -> None:
    """`mmdit-diffusers train ...`, in process."""
    from mmdit_diffusers.cli.train import main

    assert main(argv) == 0


@pytest.fixture
def guidance_seen(monkeypatch) -> list[torch.Tensor]:
    """The `guidance` of every transformer call (training steps and validation images)."""
    seen = []
    forward = MMDiTTransformer2DModel.forward

    def recording_forward(self, *args, **kwargs):
        seen.append(kwargs.get("guidance"))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(MMDiTTransformer2DModel, "forward", recording_forward)
    return seen


def generate(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red circle", height=32, width=32, num_inference_steps=2, guidance_scale=3.0, max_sequence_length=8,
                generator=torch.Generator().manual_seed(0), output_type="np").images


def test_a_flux_style_model_trained_from_scratch_is_exported_loaded_and_generates(flux_dir, data_dir, tmp_path,
                                                                                  guidance_seen):
    out = tmp_path / "scratch"
    train_command(common(flux_dir, data_dir, out, "--model_config", json.dumps(FLUX_STYLE), "--max_train_steps", "3",
                         "--learning_rate", "1e-3", "--guidance_scale", "2.5", "--caption_dropout_prob", "0.5",
                         "--validation_prompt", "a red circle", "--num_validation_images", "1",
                         "--validation_inference_steps", "2", "--validation_steps", "100"))
    # every call fed the guidance embedding --guidance_scale: 3 steps of batch 2, then the validation image (one
    # batch of [negative; positive] with true CFG against "") for 2 steps
    assert [tuple(g.tolist()) for g in guidance_seen] == [(2.5, 2.5)] * 5
    config = json.loads((out / "transformer" / "config.json").read_text())
    assert (config["depth"], config["num_single_layers"], config["pos_embed_type"]) == (1, 1, "rope")
    # I/O sizes from the FLUX folder: 4 VAE latent channels, T5 width 64, CLIP pooled width 32
    assert (config["in_channels"], config["txt_dim"], config["cond_dim"], config["guidance_embeds"]) == (4, 64, 32, True)
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "MMDiTFluxPipeline"
    assert (out / "validation" / "final.png").is_file() and (out / "README.md").is_file()

    pipe = MMDiTPipeline.from_pretrained(out)
    assert type(pipe) is MMDiTFluxPipeline and pipe.transformer.config.num_single_layers == 1
    image = generate(pipe)
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    # training moved the weights away from their initialisation (proj_out starts at zero)
    assert pipe.transformer.proj_out.weight.abs().max() > 0


def test_lora_on_a_flux_folder(flux_dir, data_dir, tmp_path, guidance_seen):
    out = tmp_path / "lora"
    train_command(common(flux_dir, data_dir, out, "--rank", "4", "--max_train_steps", "2", "--learning_rate", "1e-2",
                         "--checkpointing_steps", "2", "--cache_text_embeddings", "--validation_prompt", "a red circle",
                         "--num_validation_images", "1", "--validation_inference_steps", "2",
                         "--validation_guidance_scale", "1"))
    # diffusers' default --guidance_scale, in the 2 steps and in the final validation image (drawn from the cached
    # text embeddings, without true CFG: one call per step)
    assert [tuple(g.tolist()) for g in guidance_seen] == [(3.5, 3.5)] * 2 + [(3.5,)] * 2
    assert (out / "validation" / "final.png").is_file()
    assert "pytorch_lora_weights.safetensors" in os.listdir(out)

    pipe = MMDiTPipeline.from_pretrained(flux_dir)  # the FluxTransformer2DModel converted on load
    before = generate(pipe)
    pipe.load_lora_weights(str(out))
    after = generate(pipe)
    assert np.abs(after - before).max() > 1e-3

    # the trained model, rebuilt independently: base transformer + the adapter state of the last checkpoint
    reference = MMDiTPipeline.from_pretrained(flux_dir)
    reference.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=DEFAULT_LORA_LAYERS.split(",")))
    set_peft_model_state_dict(reference.transformer, load_file(out / "checkpoint-2" / "transformer_lora.safetensors"))
    np.testing.assert_allclose(after, generate(reference), atol=1e-5)


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_reaches_the_same_weights(flux_dir, data_dir, tmp_path):
    """A FLUX-style run (guidance embedding, single-stream blocks, RoPE) killed with SIGKILL after its first
    checkpoint and resumed with `--resume_from_checkpoint latest` ends with the weights of an uninterrupted run."""

    def argv(out):
        return [sys.executable, "-m", "mmdit_diffusers.train", *common(
            flux_dir, data_dir, out, "--model_config", json.dumps(FLUX_STYLE), "--max_train_steps", "16",
            "--checkpointing_steps", "4", "--gradient_accumulation_steps", "2", "--random_flip",
            "--caption_dropout_prob", "0.3", "--learning_rate", "2e-3", "--lr_scheduler", "cosine",
            "--guidance_scale", "4.0", "--seed", "1")]

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    reference = subprocess.Popen(argv(reference_dir), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim = subprocess.Popen(argv(killed_dir), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (killed_dir / "checkpoint-4").exists():
        assert victim.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint-4 in time"
        time.sleep(0.01)
    time.sleep(random.uniform(0.0, 0.1))  # any moment after the first checkpoint, possibly mid-save
    os.kill(victim.pid, signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    assert not (killed_dir / "model_index.json").exists(), "the run finished before it was killed"

    resumed = subprocess.run(argv(killed_dir) + ["--resume_from_checkpoint", "latest"], env=env,
                             capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stderr
    log, _ = reference.communicate(timeout=240)
    assert reference.returncode == 0, log[-3000:]

    def weights(folder):
        return load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")

    ref, res = weights(reference_dir), weights(killed_dir)
    assert ref.keys() == res.keys()
    assert max((ref[k] - res[k]).abs().max().item() for k in ref) <= 1e-6
    assert ref["guidance_mlp.linear_1.weight"].abs().max() > 0  # the guidance embedding is part of the model
