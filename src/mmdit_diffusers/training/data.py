"""Training data: image-caption sources, the image transform, the resumable batch sampler and the caches.

Sources
    - A folder in the `datasets` "imagefolder" layout, read directly with PIL (no `datasets` needed):
      `metadata.jsonl` with one `{"file_name": "a.png", "text": "a caption"}` per line (the caption column is
      `--caption_column`, default "text"; `metadata.csv` with the same columns works too). Every image in the
      folder must have a caption and every line an image; all images are checked to be readable up front.
      `load_image_folder` is the library's reader of such folders, for training and for any other use.
    - A dataset by name (`--dataset_name`) through `datasets`, imported only then: a Hub id or a builder such as
      "imagefolder" with `--data_dir` / `--data_files`, or a folder written by `save_to_disk` (read with
      `load_from_disk`; of a DatasetDict, the `--dataset_split`).
    - Streams (`--streaming`, `--train_shards`): see `streaming.py`; `sources.py` picks one or the other.

Captions
    A caption cell may hold a list of captions (a JSON list in metadata.jsonl, a list column in `datasets`). Each time
    the example is drawn one of them is taken, chosen by the example's `draw` (below); `caption(i)` is the first.

Transform
    RGB, resize to cover the target size (bicubic; `resolution` x `resolution`, or the example's aspect-ratio
    bucket, see `buckets.py`), crop to it (centre, or with --random_crop at a position chosen by the example's
    `draw`), optional horizontal flip, scale to [-1, 1] as [3, H, W] float32.

Order (`ResumableBatchSampler`)
    The examples form one endless stream of micro-batches. Epoch e is a permutation of the dataset drawn from
    `torch.Generator().manual_seed(seed + e)` (and, with --random_flip, one flip bit per example from the same
    generator); each epoch is cut into `len(dataset) // (batch_size * num_processes)` global batches (the rest is
    dropped) and process r takes rows [r * batch_size, (r + 1) * batch_size) of each. Micro-batch m is therefore a
    pure function of (seed, m): a run resumed after optimizer step s starts at m = s * gradient_accumulation_steps
    and sees exactly the data an uninterrupted run would have seen. With aspect-ratio buckets each bucket's
    examples (in permutation order) are cut into global batches and the epoch's batches are shuffled by the same
    generator: every micro-batch holds one bucket, the same bucket on every process.

Caches
    `--cache_latents`: every image (and its mirror image with --random_flip) goes through the VAE encoder once;
    the cache holds the latent *distribution* parameters (mean and log-variance, `latent_dist.parameters`), and
    each step draws a fresh latent from them (or takes the mean with `--vae_latent mode`), as without the cache.
    `--cache_text_embeddings`: each distinct caption is encoded once (`text.PromptEncoder.build_cache`), after which the
    text encoders are freed. Both caches are folders of safetensors shards on disk (`cache`): each process encodes a
    slice and writes it, every process reads the rows it needs, memory-mapped; a resumed or later run with the same
    encoders and data reuses them.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import InputError
from ..pipelines.latents import normalize_latents
from .cache import DiskCache, ExampleRows, build_or_reuse, latent_key

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


# ----------------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------------
class ImageCaptionSource(Sequence):
    """`len`, `caption(i)` (the first caption), `captions_of(i)` (all of them), `image(i)` (a PIL image),
    `size(i)` (its upright width and height) and `describe(i)` (for error messages);
    `has_several_captions`: whether some example has more than one caption."""

    has_several_captions = False

    def caption(self, index: int) -> str:
        raise NotImplementedError

    def captions_of(self, index: int) -> list[str]:
        return [self.caption(index)]

    def image(self, index: int) -> Image.Image:
        raise NotImplementedError

    def size(self, index: int) -> tuple[int, int]:
        return upright_size(self.image(index))

    def describe(self, index: int) -> str:
        return f"example {index}"

    def __getitem__(self, index):
        return self.image(index), self.caption(index)


@dataclass
class FolderSource(ImageCaptionSource):
    """An image folder read by `load_image_folder`: `files[i]` (relative to `root`) is captioned `captions[i]`.
    `source[i]` is `(PIL image, caption)`, `source.path(i)` the image's path, `source.rows()` every
    `(image path, caption)`; `several[i]`, where given, lists all the captions of image i (`captions[i]` is the
    first)."""

    root: str
    files: list[str]
    captions: list[str]
    several: dict[int, list[str]] | None = None

    def __len__(self) -> int:
        return len(self.files)

    def caption(self, index: int) -> str:
        return self.captions[index]

    def captions_of(self, index: int) -> list[str]:
        return (self.several or {}).get(index) or [self.captions[index]]

    @property
    def has_several_captions(self) -> bool:
        return bool(self.several)

    def size(self, index: int) -> tuple[int, int]:
        try:
            with Image.open(self.path(index)) as img:  # reads the header only
                return upright_size(img)
        except Exception as e:
            raise InputError(f"unreadable image {self.path(index)}: {e}") from None

    def image(self, index: int) -> Image.Image:
        path = self.path(index)
        try:
            with Image.open(path) as img:
                img.load()
                return img.copy()
        except Exception as e:  # PIL raises several types
            raise InputError(f"unreadable image {path}: {e}") from None

    def path(self, index: int) -> str:
        return os.path.join(self.root, self.files[index])

    def describe(self, index: int) -> str:
        return self.path(index)

    def rows(self) -> list[tuple[str, str]]:
        """`(image path, caption)` of every image, in the metadata's order."""
        return [(self.path(i), caption) for i, caption in enumerate(self.captions)]

    def verify(self) -> None:
        """Open every image and check it (PIL `verify`); the first bad one is an error naming it."""
        for index in range(len(self)):
            path = self.describe(index)
            try:
                with Image.open(path) as img:
                    img.verify()
            except Exception as e:
                raise InputError(f"unreadable image {path}: {e}") from None


def warn_empty_captions(captions: Sequence[str], describe) -> int:
    """Warn when captions are empty (or blank): legal, they train the unconditional model as caption dropout
    does, but more often a metadata mistake. Returns how many there are; `describe(i)` names example i."""
    empty = [i for i, caption in enumerate(captions) if not caption.strip()]
    if empty:
        shown = ", ".join(describe(i) for i in empty[:3]) + (", ..." if len(empty) > 3 else "")
        logger.warning(f"{len(empty)} of {len(captions)} captions are empty ({shown}); those images train the "
                       "unconditional model (as --caption_dropout_prob does). Fix the metadata if that is not meant.")
    return len(empty)


def caption_list(value, where: str, column: str) -> list[str]:
    """A caption cell as a list of captions: a string, or a non-empty list of strings (several captions)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise InputError(f"{where}: caption column {column!r} must hold text or a list of texts, got {value!r}.")


def _caption_text(value, where: str, column: str) -> str:
    return caption_list(value, where, column)[0]


def choose_caption(captions: Sequence[str], draw: int) -> str:
    """The caption an example shows when it is drawn with `draw` (see `SampleKey`)."""
    return captions[draw % len(captions)] if len(captions) > 1 else captions[0]


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) after the EXIF orientation (as `ImageOps.exif_transpose` turns it); reads no pixels."""
    w, h = image.size
    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception:
        orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _read_metadata(root: str) -> tuple[str, list[dict]]:
    jsonl, csv_path = os.path.join(root, "metadata.jsonl"), os.path.join(root, "metadata.csv")
    if os.path.isfile(jsonl):
        rows = []
        with open(jsonl, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{jsonl} line {line_no} is not valid JSON: {e}") from None
                if not isinstance(row, dict):
                    raise InputError(f"{jsonl} line {line_no} must be a JSON object.")
                rows.append(row)
        return jsonl, rows
    if os.path.isfile(csv_path):
        with open(csv_path, encoding="utf-8", newline="") as f:
            return csv_path, list(csv.DictReader(f))
    return "", []


def _list_images(root: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                out.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
    return out


def load_image_folder(root: str | os.PathLike, caption_column: str = "text", max_samples: int | None = None,
                      verify: bool = True, argument: str = "--train_data_dir") -> FolderSource:
    """Read an image folder in the `datasets` "imagefolder" layout: images (in subfolders too) and a
    `metadata.jsonl` (or `metadata.csv`) with one `{"file_name": ..., caption_column: ...}` row per image.

    Args:
        root: The folder.
        caption_column: The metadata column holding the captions (a list of captions: the first one).
        max_samples: Keep only the first rows.
        verify: Open every image once and check it (PIL `verify`).
        argument: How the caller's user named the folder (an option name), for the messages.

    Returns a `FolderSource`: `source[i]` -> `(PIL image, caption)`, `source.rows()` -> `[(image path, caption)]`.
    Raises `InputError` naming the file for every problem: no folder, no metadata, a row without an image or a
    caption, an image without a row, an unreadable image.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise InputError(f"{argument} {root!r}: no such folder.")
    images = _list_images(root)
    meta_path, rows = _read_metadata(root)
    if not meta_path:
        hint = f"{len(images)} image(s) without captions" if images else "no images"
        raise InputError(
            f"{argument} {root!r} has no metadata.jsonl ({hint}). Write one JSON line per image: "
            f'{{"file_name": "0001.png", "{caption_column}": "a caption"}}.'
        )
    if not rows:
        raise InputError(f"{meta_path} lists no images.")
    files, captions, several = [], [], {}
    for line_no, row in enumerate(rows, 1):
        if "file_name" not in row:
            raise InputError(f"{meta_path} entry {line_no} has no 'file_name'.")
        if caption_column not in row:
            raise InputError(
                f"caption column {caption_column!r} not found in {meta_path} (entry {line_no} has columns "
                f"{', '.join(map(repr, row))}); choose the caption column (--caption_column)."
            )
        name = str(row["file_name"]).replace("\\", "/")
        if not os.path.isfile(os.path.join(root, name)):
            raise InputError(f"{meta_path} entry {line_no}: image {os.path.join(root, name)} does not exist.")
        files.append(os.path.normpath(name).replace(os.sep, "/"))
        texts = caption_list(row[caption_column], f"{meta_path} entry {line_no}", caption_column)
        if len(texts) > 1:
            several[len(captions)] = texts
        captions.append(texts[0])
    missing = sorted(set(images) - set(files))
    if missing:
        shown = ", ".join(missing[:5]) + (f", ... ({len(missing)} in all)" if len(missing) > 5 else "")
        raise InputError(f"images without captions in {root}: {shown}; add them to {meta_path}.")
    if max_samples is not None:
        files, captions = files[:max_samples], captions[:max_samples]
        several = {i: texts for i, texts in several.items() if i < max_samples}
    warn_empty_captions(captions, lambda i: f"{meta_path} entry {i + 1} ({files[i]})")
    source = FolderSource(root, files, captions, several or None)
    if verify:
        source.verify()
    return source


def open_image_value(value, where: str, column: str) -> Image.Image:
    """A PIL image from what a `datasets` image cell holds: an image, `{"bytes"/"path"}`, raw bytes or a path."""
    import io

    try:
        if isinstance(value, Image.Image):
            return value
        if isinstance(value, dict) and value.get("bytes") is not None:
            return Image.open(io.BytesIO(value["bytes"]))
        if isinstance(value, dict) and value.get("path"):
            return Image.open(value["path"])
        if isinstance(value, (bytes, bytearray)):
            return Image.open(io.BytesIO(value))
        if isinstance(value, str):
            return Image.open(value)
    except Exception as e:
        raise InputError(f"unreadable image in {where}: {e}") from None
    raise InputError(f"{where}: column {column!r} holds no image ({type(value).__name__}).")


class HubDatasetSource(ImageCaptionSource):
    def __init__(self, dataset, image_column: str, caption_column: str, name: str):
        self.dataset, self.image_column, self.caption_column, self.name = dataset, image_column, caption_column, name
        self._undecoded = None

    def __len__(self) -> int:
        return len(self.dataset)

    def caption(self, index: int) -> str:
        return self.captions_of(index)[0]

    def captions_of(self, index: int) -> list[str]:
        return caption_list(self.dataset[index][self.caption_column], self.describe(index), self.caption_column)

    def image(self, index: int) -> Image.Image:
        return open_image_value(self.dataset[index][self.image_column], self.describe(index), self.image_column)

    def size(self, index: int) -> tuple[int, int]:
        if self._undecoded is None:  # the image column without decoding: the size is read from the header
            import datasets

            feature = self.dataset.features.get(self.image_column)
            self._undecoded = (self.dataset.cast_column(self.image_column, datasets.Image(decode=False))
                               if isinstance(feature, datasets.Image) else self.dataset)
        value = self._undecoded[index][self.image_column]
        with open_image_value(value, self.describe(index), self.image_column) as img:
            return upright_size(img)

    def describe(self, index: int) -> str:
        return f"{self.name} row {index}"


def _import_datasets(option: str):
    try:
        import datasets
    except ImportError:
        raise InputError(
            f"{option} needs the `datasets` package: pip install datasets "
            "(or use --train_data_dir with a folder of images and metadata.jsonl)."
        ) from None
    return datasets


def is_saved_dataset(path: str) -> bool:
    """A folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    return os.path.isdir(path) and (
        os.path.isfile(os.path.join(path, "dataset_dict.json"))
        or os.path.isfile(os.path.join(path, "state.json")) and os.path.isfile(os.path.join(path, "dataset_info.json")))


def data_files_value(values: Sequence[str] | None):
    """`--data_files` as `datasets.load_dataset` takes it: files / globs, or `split=file` entries (a dict)."""
    if not values:
        return None
    split_entries = [v.split("=", 1) for v in values if "=" in v and v.split("=", 1)[0].isidentifier()]
    if not split_entries:
        return list(values)
    if len(split_entries) != len(values):
        raise InputError(f"--data_files {' '.join(values)}: give either files only, or split=file entries only.")
    out: dict[str, list[str]] = {}
    for split, path in split_entries:
        out.setdefault(split, []).append(path)
    return out


def open_dataset(name: str, config_name: str | None, split: str, cache_dir: str | None = None,
                 data_dir: str | None = None, data_files=None, streaming: bool = False):
    """The `datasets` split: a `save_to_disk` folder through `load_from_disk` (a DatasetDict gives `split`),
    anything else through `load_dataset(name, config_name, split=..., data_dir=..., data_files=...)`.
    With `streaming`, an `IterableDataset`."""
    datasets = _import_datasets(f"--dataset_name {name!r}")
    if is_saved_dataset(name):
        if config_name or data_dir or data_files:
            raise InputError(f"--dataset_name {name!r} is a folder saved with `save_to_disk`; --dataset_config_name, "
                             "--data_dir and --data_files do not apply to it.")
        try:
            ds = datasets.load_from_disk(name)
        except Exception as e:
            raise InputError(f"could not load the saved dataset {name!r}: {e}") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise InputError(f"--dataset_split {split!r} is not in the saved dataset {name!r}; its splits are "
                                 f"{', '.join(ds)}.")
            ds = ds[split]
        return ds.to_iterable_dataset() if streaming else ds
    try:
        return datasets.load_dataset(name, config_name, split=split, cache_dir=cache_dir, data_dir=data_dir,
                                     data_files=data_files, streaming=streaming)
    except Exception as e:
        hint = ""
        if not (data_dir or data_files) and name in ("imagefolder", "csv", "json", "parquet", "webdataset", "text"):
            hint = f" The {name!r} builder reads local files: give --data_dir or --data_files."
        raise InputError(f"could not load dataset {name!r} (split {split!r}): {e}.{hint}") from None


def check_columns(column_names, name: str, image_column: str, caption_column: str) -> None:
    if column_names is None:  # a stream whose features are not known up front: checked at the first sample
        return
    for option, column in (("--image_column", image_column), ("--caption_column", caption_column)):
        if column not in column_names:
            raise InputError(
                f"{option} {column!r} not found in dataset {name!r}; its columns are {', '.join(column_names)}."
            )


def load_hub_dataset(name: str, config_name: str | None, split: str, image_column: str, caption_column: str,
                     cache_dir: str | None = None, max_samples: int | None = None, data_dir: str | None = None,
                     data_files=None) -> HubDatasetSource:
    ds = open_dataset(name, config_name, split, cache_dir, data_dir, data_files)
    check_columns(ds.column_names, name, image_column, caption_column)
    if max_samples is not None:
        ds = ds.select(range(min(max_samples, len(ds))))
    if len(ds) == 0:
        raise InputError(f"dataset {name!r} split {split!r} is empty.")
    cells = ds[caption_column]
    captions = [_caption_text(value, f"{name} row {i}", caption_column) for i, value in enumerate(cells)]
    warn_empty_captions(captions, lambda i: f"{name} row {i}")
    source = HubDatasetSource(ds, image_column, caption_column, name)
    source.has_several_captions = any(isinstance(value, (list, tuple)) and len(value) > 1 for value in cells)
    return source


# ----------------------------------------------------------------------------------------------------------
# Transform
# ----------------------------------------------------------------------------------------------------------
def image_to_tensor(image: Image.Image, resolution: int | tuple[int, int], flip: bool = False,
                    crop: tuple[float, float] | None = None) -> torch.Tensor:
    """RGB, resize to cover `resolution` (a side, or `(width, height)`; bicubic), crop, optional mirror;
    [3, H, W] in [-1, 1]. `crop` None takes the centre; `(u, v)` in [0, 1) puts the window's left and top edges at
    fractions u and v of the free room (a random crop)."""
    width, height = (resolution, resolution) if isinstance(resolution, int) else resolution
    image = ImageOps.exif_transpose(image).convert("RGB")
    w, h = image.size
    scale = max(width / w, height / h)
    nw, nh = max(width, round(w * scale)), max(height, round(h * scale))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.BICUBIC)
    if crop is None:
        left, top = (nw - width) // 2, (nh - height) // 2
    else:
        left = min(nw - width, int(crop[0] * (nw - width + 1)))
        top = min(nh - height, int(crop[1] * (nh - height + 1)))
    image = image.crop((left, top, left + width, top + height))
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def crop_position(draw: int) -> tuple[float, float]:
    """The random crop of an example drawn with `draw`: a pure function of it, so resuming repeats it."""
    rng = random.Random(draw)
    return rng.random(), rng.random()


# ----------------------------------------------------------------------------------------------------------
# Dataset and deterministic, resumable order
# ----------------------------------------------------------------------------------------------------------
class SampleKey(NamedTuple):
    """What the sampler decides for one example: which one, mirrored or not, its `draw` (a 31-bit integer from
    the epoch's generator that fixes the random crop and the caption choice) and its target size `(width,
    height)` (None: `resolution` square)."""

    index: int
    flip: bool = False
    draw: int = 0
    size: tuple[int, int] | None = None


class TrainDataset(torch.utils.data.Dataset):
    """Items are keyed by `SampleKey`s (a plain `(index, flip)` works too). Each item holds `index`, `flip`, and
    either `pixel_values` or, with a latent cache, `latent_params`; and either `caption` or, with a text cache,
    the cache's tensors (see `text.PromptEncoder`)."""

    def __init__(self, source: ImageCaptionSource, resolution: int, latent_cache: DiskCache | None = None,
                 text_cache: ExampleRows | None = None, random_crop: bool = False):
        self.source, self.resolution = source, resolution
        self.latent_cache, self.text_cache = latent_cache, text_cache
        self.random_crop = random_crop
        if text_cache is not None and getattr(source, "has_several_captions", False):
            logger.warning("Some examples have several captions; the text cache holds the first caption of each, "
                           "so those examples train on their first caption only (without --cache_text_embeddings "
                           "a random one is drawn each time).")

    def __len__(self) -> int:
        return len(self.source)

    def pixels(self, image: Image.Image, key: SampleKey) -> torch.Tensor:
        crop = crop_position(key.draw) if self.random_crop else None
        return image_to_tensor(image, key.size or self.resolution, key.flip, crop)

    def __getitem__(self, key):
        key = SampleKey(*key) if isinstance(key, tuple) else SampleKey(int(key))
        index, flip = key.index, key.flip
        item = {"index": index, "flip": flip}
        if self.latent_cache is not None:
            item["latent_params"] = self.latent_cache.get(index, "flipped" if flip else "plain")
        else:
            item["pixel_values"] = self.pixels(self.source.image(index), key)
        if self.text_cache is not None:
            item.update(self.text_cache[index])
        else:
            item["caption"] = choose_caption(self.source.captions_of(index), key.draw)
        return item


def collate(items: list[dict]) -> dict:
    out = {}
    for key in items[0]:
        values = [item[key] for item in items]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Endless micro-batches of `SampleKey`s for one process, starting at micro-batch `start`.

    Micro-batch m of process r: epoch e, batch j = divmod(m, batches_per_epoch); the epoch's permutation, flips
    and draws come from `torch.Generator().manual_seed(seed + e)`; rows [r*B, (r+1)*B) of the epoch's global batch
    j (G = B * num_processes examples). Without buckets global batch j is permutation entries [j*G, (j+1)*G); with
    `buckets` (a `buckets.BucketAssignment`) each bucket's examples, in permutation order, are cut into global
    batches (the rest of each bucket is dropped) and the epoch's batches are shuffled by the same generator.
    Nothing depends on state outside (seed, m), so resuming is exact.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int, num_processes: int = 1,
                 process_index: int = 0, random_flip: bool = False, start: int = 0, buckets=None):
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self.num_processes, self.process_index = num_processes, process_index
        self.random_flip, self.start, self.buckets = random_flip, start, buckets
        self.global_batch = batch_size * num_processes
        if buckets is None:
            self.batches_per_epoch = num_examples // self.global_batch
        else:
            if len(buckets.of_example) != num_examples:
                raise ValueError(f"{len(buckets.of_example)} bucket assignments for {num_examples} examples")
            counts = np.bincount(np.asarray(buckets.of_example, dtype=np.int64), minlength=len(buckets.sizes))
            self.batches_per_epoch = int(sum(int(c) // self.global_batch for c in counts))
            self._assignment = torch.as_tensor(buckets.of_example, dtype=torch.long)
        if self.batches_per_epoch == 0 and buckets is None:
            raise InputError(
                f"the dataset has {num_examples} example(s), fewer than one global batch (train_batch_size "
                f"{batch_size} x {num_processes} process(es) = {self.global_batch}); lower --train_batch_size."
            )
        if self.batches_per_epoch == 0:
            raise InputError(
                f"no aspect-ratio bucket holds one global batch (train_batch_size {batch_size} x {num_processes} "
                f"process(es) = {self.global_batch}) of the {num_examples} examples; lower --train_batch_size or "
                "use fewer buckets (--aspect_ratio_buckets)."
            )

    def epoch_plan(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The epoch's global batches `[batches_per_epoch, G]` of example indices, and the flip and draw of
        every example."""
        g = torch.Generator().manual_seed(int(self.seed) + epoch)
        perm = torch.randperm(self.num_examples, generator=g)
        flips = torch.rand(self.num_examples, generator=g) < 0.5
        if not self.random_flip:
            flips = torch.zeros_like(flips)
        draws = torch.randint(0, 2**31 - 1, (self.num_examples,), generator=g)
        G = self.global_batch
        if self.buckets is None:
            return perm[: self.batches_per_epoch * G].view(-1, G), flips, draws
        in_bucket = self._assignment[perm]
        chunks = []
        for b in range(len(self.buckets.sizes)):
            members = perm[in_bucket == b]
            k = len(members) // G
            if k:
                chunks.append(members[: k * G].view(k, G))
        rows = torch.cat(chunks)
        return rows[torch.randperm(len(rows), generator=g)], flips, draws

    def _keys(self, plan, j: int) -> list[SampleKey]:
        rows, flips, draws = plan
        lo = self.process_index * self.batch_size
        sizes = self.buckets.sizes if self.buckets is not None else None
        return [SampleKey(int(i), bool(flips[i]), int(draws[i]),
                          None if sizes is None else tuple(sizes[int(self._assignment[i])]))
                for i in rows[j, lo: lo + self.batch_size]]

    def batch(self, micro_batch: int) -> list[SampleKey]:
        epoch, j = divmod(micro_batch, self.batches_per_epoch)
        return self._keys(self.epoch_plan(epoch), j)

    def __iter__(self) -> Iterator[list[SampleKey]]:
        m = self.start
        cached_epoch, plan = None, None
        while True:
            epoch, j = divmod(m, self.batches_per_epoch)
            if epoch != cached_epoch:
                plan, cached_epoch = self.epoch_plan(epoch), epoch
            yield self._keys(plan, j)
            m += 1


def num_examples(source) -> int | None:
    """How many examples the source holds (None: a stream of unknown length)."""
    return len(source) if isinstance(source, ImageCaptionSource) else source.num_examples


def make_dataloader(dataset: TrainDataset, sampler, num_workers: int):
    """The loader of micro-batches: over `dataset` in `sampler`'s order, or a stream's own loader
    (`streaming.StreamingBatches`)."""
    if hasattr(sampler, "loader"):
        return sampler.loader(dataset, num_workers)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        persistent_workers=False,
    )


# ----------------------------------------------------------------------------------------------------------
# Latent cache and latent sampling
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_latent_params(vae, pixel_values: torch.Tensor) -> torch.Tensor:
    """VAE encoder output as distribution parameters [B, 2C, h, w] (mean, logvar); a deterministic encoder
    (no `latent_dist`) gives [B, C, h, w] latents, which `sample_latents` then uses as they are."""
    out = vae.encode(pixel_values.to(device=vae.device, dtype=vae.dtype))
    dist = getattr(out, "latent_dist", None)
    if dist is not None:
        return dist.parameters
    return out.latents if hasattr(out, "latents") else out[0]


def sample_latents(params: torch.Tensor, vae, randn, mode: bool = False) -> torch.Tensor:
    """Draw z ~ N(mean, exp(logvar)) (as `DiagonalGaussianDistribution.sample`, epsilon from `randn(shape)`), or
    take the mean with `mode=True`, and normalise it; params with as many channels as the VAE's latents are taken
    as the latents themselves."""
    params = params.float()
    channels = vae.config.latent_channels
    if params.shape[1] == 2 * channels:
        mean, logvar = params.chunk(2, dim=1)
        if mode:
            z = mean
        else:
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            z = mean + std * randn(mean.shape).to(mean.device)
    else:
        z = params
    return normalize_latents(z, vae)


@torch.no_grad()
def build_latent_cache(source: ImageCaptionSource, vae, resolution: int, random_flip: bool, accelerator, root: str,
                       batch_size: int = 8) -> DiskCache:
    """The disk cache under `root` of every image's latent distribution: row i holds `plain` (and, with
    `random_flip`, `flipped`) for example i. Each process encodes a slice of the images (`cache.build_or_reuse`),
    or an earlier run's cache is reused."""
    variants = [False, True] if random_flip else [False]

    def encode(rows: list[int]):
        for lo in range(0, len(rows), batch_size):
            idx = rows[lo: lo + batch_size]
            params = {flip: encode_latent_params(vae, torch.stack([image_to_tensor(source.image(i), resolution, flip)
                                                                   for i in idx])).float().cpu()
                      for flip in variants}
            for k, i in enumerate(idx):
                yield i, {"flipped" if flip else "plain": params[flip][k] for flip in variants}

    key = latent_key(vae, source, resolution, random_flip)
    what = f"VAE latent distributions of {len(source)} images{' (and their mirror images)' if random_flip else ''}"
    return build_or_reuse(root, key, len(source), encode, accelerator, what)
