"""End-to-end training (`mmdit_diffusers.train`) on a tiny pipeline and tiny datasets, on CPU.

In-process runs (`train(parse_args(argv))`) cover the overfit, checkpoint rotation, validation/logging, LoRA and
from-scratch paths; the model card and the Hub push, which the command line adds after `train`, run through
`mmdit_diffusers.cli.train.main`; subprocesses cover what needs real processes: a kill -9 in the middle of a run followed by
`--resume_from_checkpoint latest`, and a 2-process DDP run under `accelerate launch`.
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
from PIL import Image
from safetensors.torch import load_file
from hub_fixtures import hub_repo_id, hub_server  # noqa: F401
from conftest import free_port
from tiny_pipeline import tiny_mmdit_pipeline, write_dataset

from mmdit_diffusers import MMDiTPipeline
from mmdit_diffusers.training import TrainResult, parse_args, train
from mmdit_diffusers.errors import InputError
from mmdit_diffusers.training.args import DEFAULT_LORA_LAYERS
from mmdit_diffusers.training.data import ResumableBatchSampler, collate



pytestmark = pytest.mark.usefixtures("fresh_accelerate")




def common(base: str, data: str, out, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", base, "--train_data_dir", data, "--output_dir", str(out),
        "--resolution", "32", "--train_batch_size", "2", "--max_sequence_length", "8", "--seed", "0",
        "--report_to", "none", "--checkpointing_steps", "1000", *extra,
    ]


def run(argv: list[str]) -> TrainResult:
    return train(parse_args(argv))


def run_command(argv: list[str]) -> None:
    """`mmdit-diffusers train ...` in process: training, then the model card and (with --push_to_hub) the push."""
    from mmdit_diffusers.cli.train import main

    assert main(argv) == 0


def subprocess_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def transformer_weights(folder: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors"))


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def generate(pipe, seed: int = 0) -> np.ndarray:
    return pipe("a red circle", height=32, width=32, num_inference_steps=2, guidance_scale=2.0,
                generator=torch.Generator().manual_seed(seed), output_type="np").images


# ----------------------------------------------------------------------------------------------------------
# Fast unit checks of the pieces the end-to-end tests rely on
# ----------------------------------------------------------------------------------------------------------
def test_batch_order_is_a_pure_function_of_seed_and_position():
    full = ResumableBatchSampler(10, 2, seed=5, random_flip=True)
    stream = iter(full)
    first = [next(stream) for _ in range(12)]  # 2.4 epochs: 5 batches per epoch
    assert first == [full.batch(m) for m in range(12)]
    resumed = ResumableBatchSampler(10, 2, seed=5, random_flip=True, start=7)
    it = iter(resumed)
    assert [next(it) for _ in range(5)] == first[7:12]
    # each epoch is a permutation; flips vary
    epoch0 = [key.index for batch in first[:5] for key in batch]
    assert sorted(epoch0) == list(range(10))
    assert {key.flip for batch in first for key in batch} == {False, True}
    # two processes split each global batch of the single-process run with batch 4
    single = ResumableBatchSampler(9, 4, seed=1)  # 2 batches per epoch, 1 example dropped
    ranks = [ResumableBatchSampler(9, 2, seed=1, num_processes=2, process_index=r) for r in range(2)]
    for m in range(4):
        assert single.batch(m) == ranks[0].batch(m) + ranks[1].batch(m)


def test_yaml_config_and_command_line_precedence(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(
        "pretrained_model_name_or_path: base\ntrain_data_dir: data\nlearning_rate: 1.0e-3\nuse_ema: true\n"
        "validation_prompt: [a red circle, a cat]\nmodel_config: {preset: tiny, depth: 1}\n"
    )
    args = parse_args(["--config", str(config), "--learning_rate", "5e-4", "--no-use_ema"])
    assert args.learning_rate == 5e-4 and args.use_ema is False
    assert args.validation_prompt == ["a red circle", "a cat"]
    assert json.loads(args.model_config) == {"preset": "tiny", "depth": 1}
    lora = parse_args(["--config", str(config), "--model_config", "", "--rank", "8"])
    assert lora.use_lora and lora.rank == 8 and lora.lora_alpha == 8.0


def test_shipped_configs(base_dir, data_dir, tmp_path):
    """configs/train_tiny.yaml runs as shipped (shortened); configs/accelerate_fsdp.yaml is FULL_SHARD over the model's
    blocks (its `_no_split_modules`)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "tiny"
    result = run(["--config", os.path.join(root, "configs", "train_tiny.yaml"), "--pretrained_model_name_or_path",
                  base_dir, "--train_data_dir", data_dir, "--output_dir", str(out), "--max_train_steps", "2",
                  "--validation_inference_steps", "2", "--num_validation_images", "1", "--report_to", "none"])
    assert result.global_step == 2 and (out / "model_index.json").exists()
    assert (out / "validation" / "final.png").exists()
    # training writes no card: it returns what the card says, and the final grid as the card's sample
    assert not (out / "README.md").exists()
    assert result.output_dir == str(out) and result.card_data["training"]["optimizer steps"] == 2
    assert "trained with rectified flow" in result.card_data["description"]
    import yaml

    prompts = yaml.safe_load(open(os.path.join(root, "configs", "train_tiny.yaml")))["validation_prompt"]
    assert result.sample_images == [(" | ".join(prompts), str(out / "validation" / "final.png"))]

    fsdp = yaml.safe_load(open(os.path.join(root, "configs", "accelerate_fsdp.yaml")))
    assert fsdp["distributed_type"] == "FSDP"
    assert "fsdp_transformer_layer_cls_to_wrap" not in fsdp["fsdp_config"]  # the trainer wraps the blocks the model has
    assert fsdp["fsdp_config"]["fsdp_version"] == 2 and fsdp["fsdp_config"]["fsdp_reshard_after_forward"] is True  # FULL_SHARD
    assert fsdp["fsdp_config"]["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"


def test_caption_dropout_of_every_encoder_is_the_empty_prompt(tmp_path):
    from mmdit_diffusers.training.text import PromptEncoder

    pipe = tiny_mmdit_pipeline(seed=0, layout="sd3")
    encoder = PromptEncoder(pipe, 8, device="cpu")
    encoder.resolve_length()
    captions = ["a red circle", "two blue squares"]
    everything = encoder.encode(captions, torch.ones(2, 3, dtype=torch.bool))
    empty = pipe.encode_prompt(["", ""], do_classifier_free_guidance=False, return_attention_mask=True,
                               max_sequence_length=8)
    assert torch.equal(everything.embeds, empty[0]) and torch.equal(everything.pooled, empty[2])
    assert torch.equal(everything.mask, empty[4])
    # dropping only T5 keeps the CLIP part of the caption and empties the T5 part
    only_t5 = encoder.encode(captions, torch.tensor([[False, False, True]] * 2))
    full = encoder.encode(captions)
    assert torch.equal(only_t5.pooled, full.pooled) and not torch.equal(only_t5.embeds, full.embeds)
    # the cache (per-encoder parts, joined per step) gives the same numbers, whatever is dropped
    from accelerate import PartialState

    cache = encoder.build_cache(captions, PartialState(), str(tmp_path))
    drop = torch.tensor([[True, False, True], [False, True, False]])
    batch = collate([cache[i] for i in range(len(captions))])
    cached = encoder.from_batch(batch, drop)
    direct = encoder.encode(captions, drop)
    for name in ("embeds", "pooled", "mask"):
        assert torch.allclose(getattr(cached, name).float(), getattr(direct, name).float(), atol=1e-6)


def test_the_text_cache_encodes_each_distinct_caption_once(tmp_path):
    from accelerate import PartialState

    from mmdit_diffusers.training.text import PromptEncoder

    pipe = tiny_mmdit_pipeline(seed=0, layout="sd3")
    encoder = PromptEncoder(pipe, 8, device="cpu")
    encoder.resolve_length()
    rows = []
    pipe.text_encoder_3.register_forward_hook(lambda module, args, kwargs, out: rows.append(len(kwargs.get(
        "input_ids", args[0] if args else None))), with_kwargs=True)
    distinct = ["a red circle", "two blue squares", "a green triangle"]
    encoder.build_cache(distinct, PartialState(), str(tmp_path / "distinct"))
    rows_for_distinct = sum(rows)
    rows.clear()
    captions = [distinct[i] for i in (2, 0, 0, 1, 2, 0, 1, 1, 0)]
    cache = encoder.build_cache(captions, PartialState(), str(tmp_path / "nine"))
    assert sum(rows) == rows_for_distinct  # nine captions cost what their three distinct ones cost
    direct = encoder.encode(captions)
    cached = encoder.from_batch(collate([cache[i] for i in range(len(captions))]), None)
    for name in ("embeds", "pooled", "mask"):  # row i is captions[i]
        assert torch.allclose(getattr(cached, name).float(), getattr(direct, name).float(), atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# In-process training runs
# ----------------------------------------------------------------------------------------------------------
def test_overfits_four_image_caption_pairs(base_dir, tmp_path):
    data = write_dataset(tmp_path / "four", n=4, solid=True)
    result = run(common(base_dir, data, tmp_path / "out", "--train_batch_size", "4", "--max_train_steps", "100",
                         "--learning_rate", "1e-2", "--cache_latents", "--cache_text_embeddings",
                         "--vae_latent", "mode", "--validation_prompt", "a red square", "--num_validation_images", "1",
                         "--validation_inference_steps", "2"))
    losses = result.losses
    assert len(losses) == 100 and all(np.isfinite(losses))
    first, last = float(np.mean(losses[:10])), float(np.mean(losses[-10:]))
    assert last < 0.5 * first, (first, last)
    # validation ran from the cached text embeddings (the text encoders were freed after caching)
    assert os.path.isfile(tmp_path / "out" / "validation" / "final.png")
    pipe = MMDiTPipeline.from_pretrained(tmp_path / "out")
    assert generate(pipe).shape == (1, 32, 32, 3)


def test_checkpoint_limit_validation_grid_and_tensorboard(base_dir, data_dir, tmp_path):
    out = tmp_path / "out"
    run_command(common(base_dir, data_dir, out, "--max_train_steps", "5", "--checkpointing_steps", "1",
               "--checkpoints_total_limit", "2", "--report_to", "tensorboard", "--validation_prompt", "a red circle",
               "a cat", "--validation_steps", "2", "--num_validation_images", "2", "--validation_inference_steps", "2",
               "--cache_latents"))
    names = sorted(os.listdir(out))
    assert [n for n in names if "checkpoint" in n] == ["checkpoint-4", "checkpoint-5"]
    state = json.load(open(out / "checkpoint-5" / "training_state.json"))
    assert state["global_step"] == 5 and state["micro_batch"] == 5 and state["seed"] == 0
    assert sorted(os.listdir(out / "validation")) == ["final.png", "step-000002.png", "step-000004.png"]
    grid = Image.open(out / "validation" / "final.png")
    assert grid.size == (2 * 32, 2 * 32)  # 2 prompts (rows) x 2 images
    events = [f for _, _, files in os.walk(out / "logs") for f in files if f.startswith("events.out.tfevents")]
    assert events
    card = (out / "README.md").read_text()
    assert "validation/final.png" in card and "text-to-image" in card
    assert MMDiTPipeline.from_pretrained(out).transformer is not None


def test_lora_weights_load_into_the_base_pipeline_and_push(base_dir, data_dir, tmp_path, hub_repo_id, capfd):
    from huggingface_hub import HfApi
    from peft import LoraConfig, set_peft_model_state_dict

    out = tmp_path / "lora"
    run_command(common(base_dir, data_dir, out, "--rank", "4", "--max_train_steps", "4", "--learning_rate", "1e-2",
                       "--checkpointing_steps", "4", "--cache_text_embeddings", "--push_to_hub", "--hub_model_id",
                       hub_repo_id))
    files = sorted(os.listdir(out))
    assert "pytorch_lora_weights.safetensors" in files and "model_index.json" not in files
    # the checkpoint holds the adapter only, not the frozen base weights
    assert sorted(os.listdir(out / "checkpoint-4")) == [
        "custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl", "scheduler.bin", "training_state.json",
        "transformer_lora.safetensors"]

    pipe = MMDiTPipeline.from_pretrained(base_dir)
    before = generate(pipe)
    pipe.load_lora_weights(str(out))
    after = generate(pipe)
    assert np.abs(after - before).max() > 1e-3  # the LoRA changes the images

    # the trained model, rebuilt independently: base transformer + the adapter state of the last checkpoint
    reference = MMDiTPipeline.from_pretrained(base_dir)
    reference.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=DEFAULT_LORA_LAYERS.split(",")))
    set_peft_model_state_dict(reference.transformer, load_file(out / "checkpoint-4" / "transformer_lora.safetensors"))
    np.testing.assert_allclose(after, generate(reference), atol=1e-5)

    repo_files = HfApi().list_repo_files(hub_repo_id)
    assert "pytorch_lora_weights.safetensors" in repo_files and "README.md" in repo_files
    assert not any("checkpoint" in f or f.startswith("logs/") for f in repo_files)
    from huggingface_hub import hf_hub_download

    card = open(hf_hub_download(hub_repo_id, "README.md", cache_dir=tmp_path / "hf")).read()
    assert "trained with rectified flow" in card and "LoRA rank 4" in card  # our text + the run's training table
    printed = capfd.readouterr()
    assert os.environ["HF_TOKEN"] not in printed.out + printed.err


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # torch's rms_norm under CPU bf16 autocast
def test_from_scratch_with_a_model_config(base_dir, data_dir, tmp_path, monkeypatch):
    from mmdit_diffusers import cpu_bf16

    applied = []  # bf16 on a CPU without bf16 instructions: training applies the float32-kernel path itself
    monkeypatch.setattr(cpu_bf16, "cpu_has_bf16_instructions", lambda: False)
    monkeypatch.setattr(cpu_bf16, "use_fp32_kernels_for_bf16",
                        lambda model, apply=cpu_bf16.use_fp32_kernels_for_bf16: applied.append(model) or apply(model))
    out = tmp_path / "scratch"
    run(common(base_dir, data_dir, out, "--model_config", '{"preset": "tiny", "depth": 1, "qk_norm": "rms_norm"}',
               "--max_train_steps", "2", "--learning_rate", "1e-3", "--gradient_checkpointing", "--mixed_precision",
               "bf16", "--dataloader_num_workers", "1"))
    assert len(applied) == 1
    config = json.load(open(out / "transformer" / "config.json"))
    # I/O sizes from the pipeline's VAE (4 latent channels) and text encoders (T5 width 64, two CLIP pools 2 x 32)
    assert (config["depth"], config["hidden_size"], config["in_channels"]) == (1, 32, 4)
    assert (config["txt_dim"], config["cond_dim"], config["use_text_attention_mask"]) == (64, 64, True)
    assert config["txt_tokens"] >= 77 + 8 and config["pos_embed_max_size"] * 2 >= 16
    pipe = MMDiTPipeline.from_pretrained(out)
    assert pipe.transformer.config.depth == 1
    assert np.isfinite(generate(pipe)).all()


# ----------------------------------------------------------------------------------------------------------
# Real processes
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_kill_9_mid_run_then_resume_reaches_the_same_weights(base_dir, data_dir, tmp_path):
    """A run killed with SIGKILL at a random moment after its first checkpoint, resumed with
    `--resume_from_checkpoint latest`, ends with the weights of an uninterrupted run (EMA, random flips, caption
    dropout, gradient accumulation, warmup + cosine schedule: all state must come back)."""

    def argv(out):
        return [sys.executable, "-m", "mmdit_diffusers.train", *common(
            base_dir, data_dir, out, "--max_train_steps", "30", "--checkpointing_steps", "5",
            "--gradient_accumulation_steps", "2", "--use_ema", "--random_flip", "--caption_dropout_prob", "0.3",
            "--learning_rate", "2e-3", "--lr_scheduler", "cosine", "--lr_warmup_steps", "3", "--seed", "1")]

    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    env = subprocess_env()
    reference = subprocess.Popen(argv(reference_dir), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim = subprocess.Popen(argv(killed_dir), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (killed_dir / "checkpoint-5").exists():
        assert victim.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint-5 in time"
        time.sleep(0.01)
    time.sleep(random.uniform(0.0, 0.15))  # any moment after the first checkpoint, possibly mid-save
    os.kill(victim.pid, signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    assert not (killed_dir / "model_index.json").exists(), "the run finished before it was killed"

    resumed = subprocess.run(argv(killed_dir) + ["--resume_from_checkpoint", "latest"], env=env,
                             capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stderr
    log, _ = reference.communicate(timeout=240)
    assert reference.returncode == 0, log[-3000:]

    assert not [n for n in os.listdir(killed_dir) if n.startswith(".tmp-checkpoint")]
    # raw weights at the last step, and the exported (EMA) transformer
    raw_ref = load_file(reference_dir / "checkpoint-30" / "model.safetensors")
    raw_resumed = load_file(killed_dir / "checkpoint-30" / "model.safetensors")
    assert max_abs_diff(raw_ref, raw_resumed) <= 1e-6
    assert max_abs_diff(transformer_weights(reference_dir), transformer_weights(killed_dir)) <= 1e-6
    # and training did move the weights
    assert max_abs_diff(transformer_weights(base_dir), transformer_weights(reference_dir)) > 1e-4




@pytest.mark.slow
def test_ddp_two_processes_under_accelerate_launch(base_dir, data_dir, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU (gloo). The global batch of two processes x 2 is
    the single-process batch of 4 (same examples, same noise), so both runs end with the same weights."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "mmdit_diffusers.train",
           *common(base_dir, data_dir, out, "--max_train_steps", "4", "--checkpointing_steps", "2",
                   "--learning_rate", "1e-3", "--caption_dropout_prob", "0.2")]
    result = subprocess.run(cmd, env=subprocess_env(ACCELERATE_USE_CPU="1"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "x 2 processes" in result.stderr
    assert sorted(n for n in os.listdir(out / "checkpoint-4") if n.startswith("random_states")) == [
        "random_states_0.pkl", "random_states_1.pkl"]

    pipe = MMDiTPipeline.from_pretrained(out)
    image = generate(pipe)
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()

    single = tmp_path / "single"
    run(common(base_dir, data_dir, single, "--max_train_steps", "4", "--train_batch_size", "4",
               "--learning_rate", "1e-3", "--caption_dropout_prob", "0.2"))
    assert max_abs_diff(transformer_weights(out), transformer_weights(single)) <= 1e-4
    assert max_abs_diff(transformer_weights(out), transformer_weights(base_dir)) > 1e-4


@pytest.mark.slow
def test_processes_that_accelerate_leaves_alone_are_refused(base_dir, data_dir, tmp_path):
    """Without GPUs and without ACCELERATE_USE_CPU=1, `launch --multi_gpu` starts processes that accelerate does not
    join: each would train the same model into the same folder. The trainer stops them and says what to set."""
    out = tmp_path / "copies"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "mmdit_diffusers.train",
           *common(base_dir, data_dir, out, "--max_train_steps", "2")]
    env = subprocess_env(CUDA_VISIBLE_DEVICES="")
    env.pop("ACCELERATE_USE_CPU", None)
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "WORLD_SIZE=2" in result.stderr and "ACCELERATE_USE_CPU=1" in result.stderr
    assert not out.exists() or not any(out.glob("checkpoint-*"))


def test_caption_dropout_of_all_encoders_together():
    """--caption_dropout_all_prob drops whole rows (the unconditional input) at its rate, on top of the per-encoder
    drops; without it the draws are those of --caption_dropout_prob alone."""
    from mmdit_diffusers.training.loop import TrainingRNG

    rows = TrainingRNG(0, "cpu").caption_drop(20000, 2, 0.0, 0.25)
    assert torch.equal(rows[:, 0], rows[:, 1])  # every encoder of a row together
    assert abs(rows[:, 0].float().mean().item() - 0.25) < 0.02
    both = TrainingRNG(0, "cpu").caption_drop(20000, 2, 0.1, 0.1)
    all_dropped = both.all(dim=1).float().mean().item()
    assert abs(all_dropped - (0.1 + 0.9 * 0.01)) < 0.01  # independent drops alone reach all encoders 1% of the time
    alone, same = TrainingRNG(0, "cpu").caption_drop(64, 2, 0.3), TrainingRNG(0, "cpu").rand((64, 2)) < 0.3
    assert torch.equal(alone, same)
    assert TrainingRNG(0, "cpu").caption_drop(4, 2, 0.0, 0.0) is None


class _FakeAccelerator:
    def __init__(self, main: bool):
        self.is_main_process, self.num_processes = main, 2


@pytest.mark.parametrize("error", [InputError("--output_dir is taken"), OSError("disk full")], ids=["input", "other"])
def test_a_failure_on_the_main_process_before_training_is_raised_on_every_process(error, monkeypatch):
    """The main process's checks (run folder claim, Hub repository) fail on every process, whatever the exception:
    a process left waiting at the next collective would hang the job."""
    import accelerate.utils

    from mmdit_diffusers.training.loop import _on_main_or_raise

    sent = []

    def broadcast(objects):  # process 0 sends, the others receive what it sent
        if sent:
            objects[:] = sent[-1]
        else:
            sent.append(list(objects))

    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", broadcast)

    def check():
        raise error

    with pytest.raises(type(error)) as on_main:
        _on_main_or_raise(_FakeAccelerator(main=True), check)
    assert on_main.value is error
    expected = InputError if isinstance(error, InputError) else RuntimeError
    with pytest.raises(expected, match=str(error)):
        _on_main_or_raise(_FakeAccelerator(main=False), lambda: pytest.fail("only the main process checks"))
