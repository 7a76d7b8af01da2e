"""The disk caches of `--cache_latents` / `--cache_text_embeddings` (`mmdit_diffusers.training.cache`): reused across
a resume without encoding anything, equal to a recomputed cache and to no cache; built by two processes without
exchanging rows; one text row per distinct caption; a new folder when the data or an encoder changes; a damaged or
unfinished cache built again, an unusable folder refused."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from accelerate import PartialState
from conftest import free_port
from test_training import common, max_abs_diff, run, subprocess_env, transformer_weights
from tiny_pipeline import tiny_mmdit_pipeline, write_dataset

from mmdit_diffusers.errors import InputError
from mmdit_diffusers.training import cache, data
from mmdit_diffusers.training.text import PromptEncoder

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def cache_folders(root) -> list[str]:
    return sorted(os.listdir(root))


def read_all(folder: str) -> dict[int, dict[str, torch.Tensor]]:
    rows = cache.DiskCache(folder)
    return {r: rows[r] for r in range(len(rows))}


def same_rows(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[r].keys() == b[r].keys() and all(torch.equal(a[r][k], b[r][k]) for k in a[r]) for r in a)


def count_calls(monkeypatch, owner, name: str) -> list:
    """Wrap `owner.name` so that each call appends to the returned list."""
    calls, original = [], getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *args: calls.append(args) or original(*args))
    return calls


def latent_cache(source, vae, root, flip=False):
    return data.build_latent_cache(source, vae, 32, flip, PartialState(), str(root))


# ----------------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------------
def test_a_resumed_run_reuses_the_cache_and_matches_recomputed_and_uncached_runs(base_dir, data_dir, tmp_path,
                                                                                 monkeypatch, caplog):
    caches = ("--cache_latents", "--cache_text_embeddings", "--random_flip", "--caption_dropout_prob", "0.3")
    out = tmp_path / "run"
    first = run(common(base_dir, data_dir, out, *caches, "--max_train_steps", "2", "--checkpointing_steps", "2"))
    folders = cache_folders(out / "cache")
    assert [f.split("-")[0] for f in folders] == ["latents", "text"]
    files = {f: os.stat(f).st_mtime_ns for f in (out / "cache").rglob("*") if f.is_file()}

    encoded = count_calls(monkeypatch, data, "encode_latent_params")
    written = count_calls(monkeypatch, cache.ShardWriter, "add")
    caplog.set_level("INFO", logger="mmdit_diffusers.train")
    resumed = run(common(base_dir, data_dir, out, *caches, "--max_train_steps", "4", "--checkpointing_steps", "2",
                         "--resume_from_checkpoint", "latest"))
    assert resumed.global_step == 4 and len(resumed.losses) == 2
    assert encoded == [] and written == []  # nothing encoded, nothing written
    assert sum("Reusing cache" in r.getMessage() for r in caplog.records) == 2
    assert {f: os.stat(f).st_mtime_ns for f in (out / "cache").rglob("*") if f.is_file()} == files
    monkeypatch.undo()

    # an uninterrupted run computes the same cache (same folders, same rows) and the same losses
    again = run(common(base_dir, data_dir, tmp_path / "again", *caches, "--max_train_steps", "4",
                       "--dataloader_num_workers", "1"))
    assert cache_folders(tmp_path / "again" / "cache") == folders
    for folder in folders:
        assert same_rows(read_all(str(out / "cache" / folder)), read_all(str(tmp_path / "again" / "cache" / folder)))
    assert again.losses[:2] == first.losses and again.losses[2:] == pytest.approx(resumed.losses, rel=1e-6)

    # and a run without caches: the same losses (encoders run on other batches, hence rounding only)
    uncached = run(common(base_dir, data_dir, tmp_path / "uncached", "--random_flip", "--caption_dropout_prob", "0.3",
                          "--max_train_steps", "4"))
    assert not (tmp_path / "uncached" / "cache").exists()
    assert uncached.losses == pytest.approx(again.losses, rel=1e-5)


@pytest.mark.slow
def test_two_processes_build_the_cache_without_exchanging_rows(base_dir, data_dir, tmp_path):
    """`accelerate launch --num_processes 2` with both caches, under a launcher that makes gathering objects an error:
    process p writes the shards of rows [p * N / 2, (p + 1) * N / 2) only, and the run ends with the weights of a
    single-process run without caches (global batch 4)."""
    script = tmp_path / "train_without_gather.py"
    script.write_text(
        "import sys\nimport accelerate.utils, accelerate.utils.operations, torch.distributed\n"
        "def refuse(*args, **kwargs):\n    raise AssertionError('rows were gathered')\n"
        "accelerate.utils.gather_object = accelerate.utils.operations.gather_object = refuse\n"
        "torch.distributed.all_gather_object = refuse\n"
        "from mmdit_diffusers.cli.train import main\nsys.exit(main(sys.argv[1:]))\n")
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(script),
           *common(base_dir, data_dir, out, "--max_train_steps", "3", "--learning_rate", "1e-3",
                   "--cache_latents", "--cache_text_embeddings", "--caption_dropout_prob", "0.2")]
    result = subprocess.run(cmd, env=subprocess_env(ACCELERATE_USE_CPU="1"), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stderr.count("Caching VAE latent distributions of 8 images") == 1  # logged by the main process

    for folder, num_rows in (("latents", 8), ("text", 8)):  # 8 images, 8 distinct captions
        (path,) = (out / "cache").glob(f"{folder}-*")
        manifest = json.loads((path / "manifest.json").read_text())
        assert manifest["num_rows"] == num_rows
        from safetensors.torch import load_file

        for name, _ in manifest["shards"]:
            rank = int(name.split("-")[0])
            rows = load_file(path / name)["rows"].tolist()
            assert rows and all(rank * num_rows // 2 <= r < (rank + 1) * num_rows // 2 for r in rows), (name, rows)
        assert {int(name.split("-")[0]) for name, _ in manifest["shards"]} == {0, 1}

    single = tmp_path / "single"
    run(common(base_dir, data_dir, single, "--max_train_steps", "3", "--train_batch_size", "4",
               "--learning_rate", "1e-3", "--caption_dropout_prob", "0.2"))
    assert max_abs_diff(transformer_weights(out), transformer_weights(single)) <= 1e-4
    assert max_abs_diff(transformer_weights(out), transformer_weights(base_dir)) > 1e-4


# ----------------------------------------------------------------------------------------------------------
# The cache on its own
# ----------------------------------------------------------------------------------------------------------
def test_the_text_cache_holds_one_row_per_distinct_caption(tmp_path):
    pipe = tiny_mmdit_pipeline(seed=0, layout="sd3", masked=True)
    encoder = PromptEncoder(pipe, 8, device="cpu")
    encoder.resolve_length()
    distinct = ["a red circle", "two blue squares", "a green triangle"]
    captions = [distinct[i] for i in (1, 0, 0, 2, 1, 1, 0, 2, 2, 0, 1, 0)]
    rows = encoder.build_cache(captions, PartialState(), str(tmp_path))
    (folder,) = tmp_path.glob("text-*")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["num_rows"] == 3
    from safetensors.torch import load_file

    assert sorted(r for name, _ in manifest["shards"] for r in load_file(folder / name)["rows"].tolist()) == [0, 1, 2]
    # DataLoader workers get the cache pickled: the folder and the index, not the mapped shards' data
    copy = pickle.loads(pickle.dumps(rows))
    assert len(pickle.dumps(rows)) < 4096 and all(torch.equal(copy[5][k], v) for k, v in rows[5].items())
    # example i reads its caption's row: captions[i]'s encoding
    direct = encoder._encode_each({name: captions for name in encoder.encoders})
    for i in range(len(captions)):
        for name, out in direct.items():
            assert torch.allclose(rows[i][f"text.{name}.hidden"], out.hidden[i], atol=1e-6)
            assert torch.equal(rows[i][f"text.{name}.mask"], out.mask[i])


def test_the_fingerprint_changes_with_the_data_and_the_encoders(tmp_path):
    pipe = tiny_mmdit_pipeline(seed=0, layout="sd3", masked=True)
    source = data.load_image_folder(write_dataset(tmp_path / "images", n=4))
    key = cache.cache_folder(str(tmp_path), cache.latent_key(pipe.vae, source, 32, False))
    rebuilt = tiny_mmdit_pipeline(seed=0, layout="sd3", masked=True)  # the same weights in another object: same key
    assert cache.cache_folder(str(tmp_path), cache.latent_key(rebuilt.vae, source, 32, False)) == key
    assert cache.cache_folder(str(tmp_path), cache.latent_key(pipe.vae, source, 64, False)) != key
    assert cache.cache_folder(str(tmp_path), cache.latent_key(pipe.vae, source, 32, True)) != key
    other_vae = tiny_mmdit_pipeline(seed=1, layout="sd3", masked=True).vae
    assert cache.cache_folder(str(tmp_path), cache.latent_key(other_vae, source, 32, False)) != key
    with torch.no_grad():
        rebuilt.vae.decoder.conv_out.weight.add_(1e-3)  # a fine-tuned decoder: other weights
    assert cache.cache_folder(str(tmp_path), cache.latent_key(rebuilt.vae, source, 32, False)) != key
    assert cache.cache_folder(str(tmp_path), cache.latent_key(pipe.vae.to(torch.float16), source, 32, False)) != key
    pipe.vae.to(torch.float32)
    os.utime(source.path(2), ns=(0, 1_000_000_000))  # an image replaced (another modification time)
    assert cache.cache_folder(str(tmp_path), cache.latent_key(pipe.vae, source, 32, False)) != key

    encoder = PromptEncoder(pipe, 8, device="cpu")
    names, tokenizers = encoder.encoders, {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2",
                                           "text_encoder_3": "tokenizer_3"}

    def text_folder(length=8, captions=("a red circle", "a cat")):
        return cache.cache_folder(str(tmp_path), cache.text_key(pipe, names, tokenizers, length, False, list(captions)))

    text = text_folder()
    assert text_folder() == text and text.startswith(str(tmp_path / "text-"))
    assert text_folder(length=16) != text
    assert text_folder(captions=("a red circle", "a dog")) != text
    pipe.text_encoder_3.to(torch.bfloat16)  # --mixed_precision bf16 encodes in bfloat16
    assert text_folder() != text


def test_a_damaged_or_unfinished_cache_is_built_again(tmp_path, monkeypatch, caplog):
    pipe = tiny_mmdit_pipeline(seed=0, layout="sd3", masked=True)
    source = data.load_image_folder(write_dataset(tmp_path / "images", n=6))
    monkeypatch.setattr(cache, "SHARD_BYTES", 1)  # one row per shard
    original = read_all(str(latent_cache(source, pipe.vae, tmp_path / "cache", flip=True).folder))
    (folder,) = (tmp_path / "cache").glob("latents-*")
    assert len(list(folder.glob("*.safetensors"))) == 6

    encoded = count_calls(monkeypatch, data, "encode_latent_params")
    caplog.set_level("INFO", logger="mmdit_diffusers.train")
    shard = sorted(folder.glob("*.safetensors"))[3]
    shard.write_bytes(shard.read_bytes()[:-5])  # truncated
    rebuilt = latent_cache(source, pipe.vae, tmp_path / "cache", flip=True)
    assert encoded and any("is damaged: shard 00000-00003.safetensors is truncated" in r.getMessage()
                           for r in caplog.records)
    assert same_rows(read_all(rebuilt.folder), original)

    # a build killed after some shards: no manifest, so those shards are never read; the next run builds again
    def encode_then_die(rows):
        yield rows[0], {"plain": torch.ones(2)}
        yield rows[1], {"plain": torch.ones(2)}
        raise KeyboardInterrupt

    key = {"kind": "latents", "test": 1}
    with pytest.raises(KeyboardInterrupt):
        cache.build_or_reuse(str(tmp_path / "cache"), key, 4, encode_then_die, PartialState(), "rows")
    unfinished = cache.cache_folder(str(tmp_path / "cache"), key)
    assert len(os.listdir(unfinished)) == 2 and not os.path.exists(os.path.join(unfinished, "manifest.json"))
    with pytest.raises(cache.CacheDamaged, match="no manifest.json"):
        cache.DiskCache(unfinished)
    rows = cache.build_or_reuse(str(tmp_path / "cache"), key, 4, lambda rows: ((r, {"plain": torch.full((2,), r)})
                                                                                 for r in rows), PartialState(), "rows")
    assert [rows.get(r, "plain").tolist() for r in range(4)] == [[r, r] for r in range(4)]


def test_a_cache_folder_that_cannot_be_written_is_refused(base_dir, data_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    refusal = r"--embeddings_cache_dir .*a-file.* cannot write the cache there: .* is a file"
    with pytest.raises(InputError, match=refusal):
        run(common(base_dir, data_dir, tmp_path / "out", "--cache_latents", "--embeddings_cache_dir", str(blocker),
                   "--max_train_steps", "1"))
