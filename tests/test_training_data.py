"""Training data at scale: `datasets` sources (data_dir / data_files, save_to_disk folders), streams (tar shards,
`datasets` streaming) split across processes and resumable, aspect-ratio buckets, random crops and captions.

Unit checks run on tiny folders and shards; the end-to-end checks train a few steps of the tiny pipeline
(`tiny_pipeline.py`) through `train(parse_args([...]))`.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_pipeline import write_dataset

from mmdit_diffusers.errors import InputError
from mmdit_diffusers.training import parse_args, train
from mmdit_diffusers.training.buckets import BucketAssignment, auto_buckets, check_sizes, nearest_bucket
from mmdit_diffusers.training.data import (
    ResumableBatchSampler,
    SampleKey,
    TrainDataset,
    image_to_tensor,
    load_image_folder,
)
from mmdit_diffusers.training.sources import load_source, make_sampler
from mmdit_diffusers.training.streaming import StreamingBatches

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return write_dataset(tmp_path_factory.mktemp("data") / "images", n=6)


def data_args(tmp_path, *extra: str):
    return parse_args(["--pretrained_model_name_or_path", "base", "--output_dir", str(tmp_path / "out"),
                       "--cache_dir", str(tmp_path / "hf-cache"), "--seed", "0", "--train_batch_size", "2", *extra])


def metadata_captions(folder: str) -> list[str]:
    with open(os.path.join(folder, "metadata.jsonl"), encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def picture(width: int, height: int, seed: int) -> Image.Image:
    """A picture whose every crop differs: red grows along x, green along y, blue depends on the seed."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    rgb = np.stack([x * 255 // width, y * 255 // height, (x * y + 37 * seed) % 256], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


class MemorySource:
    """A minimal in-memory source of images and caption lists."""

    def __init__(self, images, captions=None):
        self.images, self.captions = images, captions or [["a"]] * len(images)

    def __len__(self):
        return len(self.images)

    def image(self, i):
        return self.images[i]

    def captions_of(self, i):
        return self.captions[i]


def write_shards(root, num_shards: int, per_shard: int, json_captions: bool = False) -> list[str]:
    """WebDataset-style tar shards: `<key>.png` with `<key>.txt` (or `<key>.json` {"text": [two captions]})."""
    os.makedirs(root, exist_ok=True)
    paths = []
    for s in range(num_shards):
        path = os.path.join(root, f"shard-{s:03d}.tar")
        with tarfile.open(path, "w") as tar:
            for k in range(per_shard):
                key = f"s{s}k{k}"
                buf = io.BytesIO()
                picture(40, 32, 7 * s + k).save(buf, format="PNG")
                caption = (json.dumps({"text": [f"{key} one", f"{key} two"]}) if json_captions else key).encode()
                for name, payload in ((f"{key}.png", buf.getvalue()), (f"{key}.{'json' if json_captions else 'txt'}", caption)):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        paths.append(path)
    return paths


def stream_captions(batches, count: int) -> list[list[str]]:
    it = iter(batches)
    return [next(it)["caption"] for _ in range(count)]


# ----------------------------------------------------------------------------------------------------------
# `datasets` sources
# ----------------------------------------------------------------------------------------------------------
def test_imagefolder_through_data_dir_and_data_files(folder, tmp_path):
    by_dir = load_source(data_args(tmp_path, "--dataset_name", "imagefolder", "--data_dir", folder))
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder))
    by_files = load_source(data_args(tmp_path, "--dataset_name", "imagefolder", "--data_files", *files))
    expected = metadata_captions(folder)
    for source in (by_dir, by_files):
        assert sorted(source.caption(i) for i in range(len(source))) == sorted(expected)
        assert source.image(0).size == (32, 32) and source.size(0) == (32, 32)


def test_imagefolder_without_data_names_the_missing_option(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="--data_dir or --data_files"):
        load_source(data_args(tmp_path, "--dataset_name", "imagefolder"))


def test_save_to_disk_folder_and_its_split(tmp_path):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    train_split = datasets.Dataset.from_dict(
        {"image": [picture(32, 32, i) for i in range(4)], "text": [f"train {i}" for i in range(4)]}, features=features)
    valid_split = datasets.Dataset.from_dict({"image": [picture(48, 32, 9)], "text": ["valid 0"]}, features=features)
    train_split.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": train_split, "validation": valid_split}).save_to_disk(str(tmp_path / "dict"))

    single = load_source(data_args(tmp_path, "--dataset_name", str(tmp_path / "single")))
    assert [single.caption(i) for i in range(4)] == [f"train {i}" for i in range(4)]
    picked = load_source(data_args(tmp_path, "--dataset_name", str(tmp_path / "dict"), "--dataset_split", "validation"))
    assert len(picked) == 1 and picked.caption(0) == "valid 0" and picked.size(0) == (48, 32)
    with pytest.raises(InputError, match="its splits are train, validation"):
        load_source(data_args(tmp_path, "--dataset_name", str(tmp_path / "dict"), "--dataset_split", "test"))


def test_options_that_need_datasets_name_the_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(InputError, match="pip install datasets"):
        load_source(data_args(tmp_path, "--dataset_name", "imagefolder", "--data_dir", str(tmp_path)))


@pytest.mark.parametrize("extra, message", [
    (["--train_data_dir", "d", "--data_dir", "x"], "--data_dir is passed to `datasets.load_dataset`"),
    (["--dataset_name", "x", "--streaming"], "give --max_train_steps"),
    (["--train_shards", "x.tar", "--max_train_steps", "1", "--cache_latents"], "--cache_latents needs the whole"),
    (["--dataset_name", "x", "--streaming", "--max_train_steps", "1", "--aspect_ratio_buckets", "auto"],
     "--aspect_ratio_buckets needs the whole"),
    (["--train_data_dir", "d", "--cache_latents", "--random_crop"], "cannot be combined with --random_crop"),
    (["--train_data_dir", "d", "--aspect_ratio_buckets", "wide"], "expected 'auto' or WIDTHxHEIGHT"),
    (["--train_data_dir", "d", "--train_shards", "x.tar"], "exactly one of"),
])
def test_data_option_combinations_are_checked(tmp_path, extra, message):
    with pytest.raises(InputError, match=message):
        data_args(tmp_path, *extra)


# ----------------------------------------------------------------------------------------------------------
# Random crops and captions
# ----------------------------------------------------------------------------------------------------------
def test_random_crop_is_a_function_of_the_draw():
    image = picture(64, 32, 3)
    centre = image_to_tensor(image, 32)
    expected = np.asarray(image.crop((16, 0, 48, 32)), dtype=np.float32) / 127.5 - 1
    assert torch.equal(centre, torch.from_numpy(expected).permute(2, 0, 1))
    dataset = TrainDataset(MemorySource([image]), 32, random_crop=True)
    same = [dataset[SampleKey(0, False, draw)]["pixel_values"] for draw in (11, 11)]
    assert torch.equal(*same)
    crops = {dataset[SampleKey(0, False, draw)]["pixel_values"].numpy().tobytes() for draw in range(12)}
    assert len(crops) > 3  # the window moves with the draw
    assert torch.equal(TrainDataset(MemorySource([image]), 32)[SampleKey(0, False, 11)]["pixel_values"], centre)


def test_a_random_caption_of_several_fixed_by_seed_and_position(tmp_path):
    root = write_dataset(tmp_path / "multi", n=4)
    rows = [json.loads(line) for line in open(os.path.join(root, "metadata.jsonl"), encoding="utf-8")]
    with open(os.path.join(root, "metadata.jsonl"), "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({"file_name": row["file_name"], "text": [row["text"], row["text"] + " again"]}) + "\n")
    source = load_image_folder(root)
    assert source.caption(0) == rows[0]["text"] and source.captions_of(0) == [rows[0]["text"], rows[0]["text"] + " again"]
    dataset = TrainDataset(source, 32)
    sampler = ResumableBatchSampler(4, 2, seed=3)
    seen = [dataset[key]["caption"] for m in range(20) for key in sampler.batch(m)]
    assert {c.endswith(" again") for c in seen} == {True, False}  # both captions are drawn
    resumed = ResumableBatchSampler(4, 2, seed=3, start=13)
    it = iter(resumed)
    assert [dataset[key]["caption"] for _ in range(3) for key in next(it)] == seen[26:32]


# ----------------------------------------------------------------------------------------------------------
# Aspect-ratio buckets
# ----------------------------------------------------------------------------------------------------------
def test_auto_buckets_have_the_area_and_sides_asked_for():
    sizes = auto_buckets(1024, 16)
    assert (1024, 1024) in sizes and len(sizes) > 8
    assert {(h, w) for w, h in sizes} == set(sizes)  # every landscape size also upright
    for w, h in sizes:
        assert w % 16 == 0 and h % 16 == 0
        assert 0.5 <= w / h <= 2.0
        assert abs(w * h - 1024 * 1024) / (1024 * 1024) < 0.08
    assert nearest_bucket(1600, 900, sizes) == min(range(len(sizes)), key=lambda b: abs(sizes[b][0] / sizes[b][1] - 16 / 9))


def test_a_bucket_the_transformer_cannot_take_is_named():
    with pytest.raises(InputError, match="60x32: sides must be multiples of .* = 8"):
        check_sizes([(32, 32), (60, 32)], scale=4, patch=2, grid_size=8)
    with pytest.raises(InputError, match="96x32 gives 24x8 latents .* position grid"):
        check_sizes([(96, 32)], scale=4, patch=2, grid_size=8)
    check_sizes([(64, 32), (32, 64)], scale=4, patch=2, grid_size=8)


def test_bucketed_batches_hold_one_shape_resume_exactly_and_split_across_processes():
    sizes = [(48, 24), (32, 32), (24, 48)]
    of_example = [i % 3 for i in range(26)]
    buckets = BucketAssignment(sizes, of_example)
    single = ResumableBatchSampler(26, 4, seed=7, buckets=buckets)
    assert single.batches_per_epoch == 2 + 2 + 2  # 9, 9, 8 examples -> 2 batches of 4 each
    epoch = [single.batch(m) for m in range(single.batches_per_epoch)]
    for batch in epoch:
        assert len({key.size for key in batch}) == 1
        assert all(key.size == sizes[of_example[key.index]] for key in batch)
    seen = [key.index for batch in epoch for key in batch]
    assert len(set(seen)) == len(seen) == 24
    assert [b[0].size for b in epoch] != sorted((b[0].size for b in epoch), key=sizes.index)  # buckets interleave
    it = iter(ResumableBatchSampler(26, 4, seed=7, buckets=buckets, start=5))
    assert [next(it) for _ in range(4)] == [single.batch(m) for m in range(5, 9)]
    ranks = [ResumableBatchSampler(26, 2, seed=7, num_processes=2, process_index=r, buckets=buckets) for r in range(2)]
    for m in range(8):
        a, b = ranks[0].batch(m), ranks[1].batch(m)
        assert a + b == single.batch(m) and not {k.index for k in a} & {k.index for k in b}


# ----------------------------------------------------------------------------------------------------------
# Streams
# ----------------------------------------------------------------------------------------------------------
def test_tar_shards_are_disjoint_across_processes_and_resume_at_the_right_sample(tmp_path):
    write_shards(tmp_path / "shards", num_shards=4, per_shard=3)
    args = data_args(tmp_path, "--train_shards", str(tmp_path / "shards"), "--max_train_steps", "5",
                     "--resolution", "32", "--random_flip", "--random_crop")
    source = load_source(args)
    dataset = TrainDataset(source, 32, random_crop=True)
    ranks = [make_sampler(args, source, 0, 2, r) for r in range(2)]
    epoch = [stream_captions(ranks[r].loader(dataset, 0), 3) for r in range(2)]  # 6 samples = one local epoch
    keys = [{c for batch in captions for c in batch} for captions in epoch]
    assert len(keys[0]) == len(keys[1]) == 6 and not keys[0] & keys[1]
    assert keys[0] | keys[1] == {f"s{s}k{k}" for s in range(4) for k in range(3)}
    assert keys[0] == {f"s{s}k{k}" for s in (0, 2) for k in range(3)}  # process r owns shards r, r + 2

    it = iter(ranks[0].loader(dataset, 0))
    uninterrupted = [next(it) for _ in range(7)]  # past the first local epoch (3 micro-batches)
    assert [b["caption"] for b in uninterrupted[:3]] == epoch[0]
    assert [b["caption"] for b in uninterrupted[3:6]] != epoch[0]  # the next local epoch is reshuffled
    resumed = StreamingBatches(source, 2, 0, 2, 0, random_flip=True, start=4)
    it = iter(resumed.loader(dataset, 0))
    for expected in uninterrupted[4:7]:
        got = next(it)
        assert got["caption"] == expected["caption"] and got["flip"] == expected["flip"]
        assert torch.equal(got["pixel_values"], expected["pixel_values"])
    # random access (any order) agrees with walking forward, across local epochs
    walked = [ranks[1].stream.locate(p) for p in range(40)]
    jumping = StreamingBatches(source, 2, 0, 2, 1).stream
    for p in (37, 5, 22, 0, 39, 6, 11):
        assert jumping.locate(p) == walked[p]
    assert [walked[p][2].key for p in range(6)] != [walked[p][2].key for p in range(6, 12)]
    assert sorted(w[2].key for w in walked[:6]) == sorted(w[2].key for w in walked[6:12])
    workers = iter(StreamingBatches(source, 2, 0, 2, 0, random_flip=True, start=4).loader(dataset, 2))
    assert [next(workers)["caption"] for _ in range(3)] == [b["caption"] for b in uninterrupted[4:7]]


def test_tar_json_captions_give_a_random_caption(tmp_path):
    write_shards(tmp_path / "shards", num_shards=1, per_shard=4, json_captions=True)
    args = data_args(tmp_path, "--train_shards", str(tmp_path / "shards" / "*.tar"), "--max_train_steps", "1")
    source = load_source(args)
    captions = [c for batch in stream_captions(make_sampler(args, source, 0, 1, 0).loader(
        TrainDataset(source, 32), 0), 12) for c in batch]
    assert {c.split()[-1] for c in captions} == {"one", "two"}


def test_bad_shards_are_named(tmp_path):
    (tmp_path / "packed.tar.gz").write_bytes(b"\x1f\x8b not a tar")
    args = data_args(tmp_path, "--train_shards", str(tmp_path / "packed.tar.gz"), "--max_train_steps", "1")
    with pytest.raises(InputError, match="packed.tar.gz is not a readable uncompressed tar"):
        load_source(args)
    with tarfile.open(tmp_path / "nocaption.tar", "w") as tar:
        buf = io.BytesIO()
        picture(8, 8, 0).save(buf, format="PNG")
        info = tarfile.TarInfo("a/0001.png")
        info.size = len(buf.getvalue())
        tar.addfile(info, io.BytesIO(buf.getvalue()))
    args = data_args(tmp_path, "--train_shards", str(tmp_path / "nocaption.tar"), "--max_train_steps", "1")
    with pytest.raises(InputError, match=r"sample 'a/0001' of .*nocaption.tar has no caption \(.text, .txt or .json member\); it has .png"):
        load_source(args)
    shards = write_shards(tmp_path / "one", num_shards=1, per_shard=2)
    args = data_args(tmp_path, "--train_shards", *shards, "--max_train_steps", "1")
    with pytest.raises(InputError, match="1 shard\\(s\\) for 2 processes"):
        make_sampler(args, load_source(args), 0, 2, 0)


def test_bucket_of_a_rotated_photo_follows_its_upright_shape(tmp_path):
    root = tmp_path / "exif"
    root.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40x20, shown rotated: 20 wide, 40 high
    picture(40, 20, 1).save(root / "0.jpg", exif=exif)
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "0.jpg", "text": "a"}) + "\n")
    source = load_image_folder(str(root))
    assert source.size(0) == (20, 40)
    assert nearest_bucket(*source.size(0), [(48, 24), (24, 48)]) == 1
    assert TrainDataset(source, 32)[SampleKey(0, size=(24, 48))]["pixel_values"].shape == (3, 48, 24)


def test_a_datasets_stream_is_disjoint_across_processes_and_resumes(folder, tmp_path):
    args = data_args(tmp_path, "--dataset_name", "imagefolder", "--data_dir", folder, "--streaming",
                     "--max_train_steps", "3", "--resolution", "32")
    source = load_source(args)
    dataset = TrainDataset(source, 32)
    ranks = [make_sampler(args, source, 0, 2, r) for r in range(2)]
    per_rank = [sum(stream_captions(ranks[r].loader(dataset, 0), 2), [])[:3] for r in range(2)]  # a local epoch
    assert len(set(per_rank[0])) == len(set(per_rank[1])) == 3 and not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(metadata_captions(folder))
    it = iter(make_sampler(args, source, 0, 2, 1).loader(dataset, 0))
    uninterrupted = [next(it)["caption"] for _ in range(5)]
    resumed = StreamingBatches(source, 2, 0, 2, 1, start=3)
    it = iter(resumed.loader(dataset, 0))
    assert [next(it)["caption"] for _ in range(2)] == uninterrupted[3:5]


# ----------------------------------------------------------------------------------------------------------
# End to end: a few steps of the tiny pipeline
# ----------------------------------------------------------------------------------------------------------
def common(base: str, out, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", base, "--output_dir", str(out), "--resolution", "32",
            "--train_batch_size", "2", "--max_sequence_length", "8", "--seed", "0", "--report_to", "none",
            "--checkpointing_steps", "1000", *extra]


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> str:
    """Eight images, half 48x24 and half 24x48."""
    root = tmp_path_factory.mktemp("mixed")
    with open(root / "metadata.jsonl", "w", encoding="utf-8") as f:
        for i in range(8):
            picture(*((48, 24) if i % 2 else (24, 48)), i).save(root / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": "a red circle"}) + "\n")
    return str(root)


def test_training_with_buckets_sees_both_shapes(base_dir, mixed_folder, tmp_path, monkeypatch):
    from mmdit_diffusers.training import loop

    shapes = []
    real = loop.data.encode_latent_params
    monkeypatch.setattr(loop.data, "encode_latent_params",
                        lambda vae, pixels: shapes.append(tuple(pixels.shape[2:])) or real(vae, pixels))
    result = train(parse_args(common(base_dir, tmp_path / "out", "--train_data_dir", mixed_folder, "--max_train_steps",
                                     "4", "--aspect_ratio_buckets", "48x24", "24x48", "--random_crop")))
    assert result.global_step == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    assert set(shapes) == {(24, 48), (48, 24)}  # [height, width] of each bucket, one per batch


def test_a_new_transformer_covers_the_auto_buckets(base_dir, mixed_folder, tmp_path):
    out = tmp_path / "scratch"
    train(parse_args(common(base_dir, out, "--train_data_dir", mixed_folder, "--max_train_steps", "1",
                            "--model_config", '{"preset": "tiny", "depth": 1}', "--aspect_ratio_buckets", "auto")))
    config = json.load(open(out / "transformer" / "config.json"))
    widest = max(max(size) for size in auto_buckets(32, 2 * config["patch_size"]))  # the tiny VAE scales by 2
    assert config["pos_embed_max_size"] * config["patch_size"] * 2 >= widest > 32


def test_a_bucket_the_model_cannot_take_stops_before_training(base_dir, mixed_folder, tmp_path):
    with pytest.raises(InputError, match="--aspect_ratio_buckets 96x32 gives 48x16 latents"):
        train(parse_args(common(base_dir, tmp_path / "out", "--train_data_dir", mixed_folder, "--max_train_steps", "1",
                                "--aspect_ratio_buckets", "32x32", "96x32")))
    assert not (tmp_path / "out" / "transformer").exists()


def test_training_from_a_streamed_imagefolder(base_dir, folder, tmp_path):
    result = train(parse_args(common(base_dir, tmp_path / "out", "--dataset_name", "imagefolder", "--data_dir", folder,
                                     "--cache_dir", str(tmp_path / "hf-cache"), "--streaming", "--max_train_steps", "2")))
    assert result.global_step == 2 and len(result.losses) == 2


def test_training_from_tar_shards_resumes_where_it_stopped(base_dir, tmp_path):
    shards = write_shards(tmp_path / "shards", num_shards=2, per_shard=3)
    full = train(parse_args(common(base_dir, tmp_path / "full", "--train_shards", *shards, "--max_train_steps", "4")))
    first = train(parse_args(common(base_dir, tmp_path / "half", "--train_shards", *shards, "--max_train_steps", "2",
                                    "--checkpointing_steps", "2")))
    second = train(parse_args(common(base_dir, tmp_path / "half", "--train_shards", *shards, "--max_train_steps", "4",
                                     "--resume_from_checkpoint", "latest")))
    assert first.global_step == 2 and second.global_step == 4
    assert first.losses + second.losses == pytest.approx(full.losses, rel=1e-5)
    assert full.card_data["training"]["examples"] == "streamed"
