"""Training data: image-caption sources, the image transform, the resumable batch sampler and the caches.

Sources
    - A folder in the `datasets` "imagefolder" layout, read directly with PIL (no `datasets` needed):
      `metadata.jsonl` with one `{"file_name": "a.png", "text": "a caption"}` per line (the caption column is
      `--caption_column`, default "text"; `metadata.csv` with the same columns works too). Every image in the
      folder must have a caption and every line an image; all images are checked to be readable up front.
      `load_image_folder` is the library's reader of such folders, for training and for any other use.
    - A dataset by name (`--dataset_name`) through `datasets`, imported only then.

Transform
    RGB, resize the short side to `resolution` (bicubic), centre-crop to a square, optional horizontal flip,
    scale to [-1, 1] as [3, resolution, resolution] float32.

Order (`ResumableBatchSampler`)
    The examples form one endless stream of micro-batches. Epoch e is a permutation of the dataset drawn from
    `torch.Generator().manual_seed(seed + e)` (and, with --random_flip, one flip bit per example from the same
    generator); each epoch is cut into `len(dataset) // (batch_size * num_processes)` global batches (the rest is
    dropped) and process r takes rows [r * batch_size, (r + 1) * batch_size) of each. Micro-batch m is therefore a
    pure function of (seed, m): a run resumed after optimizer step s starts at m = s * gradient_accumulation_steps
    and sees exactly the data an uninterrupted run would have seen.

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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

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
    """`len`, `caption(i)`, `image(i)` (a PIL image) and `describe(i)` (for error messages)."""

    def caption(self, index: int) -> str:
        raise NotImplementedError

    def image(self, index: int) -> Image.Image:
        raise NotImplementedError

    def describe(self, index: int) -> str:
        return f"example {index}"

    def __getitem__(self, index):
        return self.image(index), self.caption(index)


@dataclass
class FolderSource(ImageCaptionSource):
    """An image folder read by `load_image_folder`: `files[i]` (relative to `root`) is captioned `captions[i]`.
    `source[i]` is `(PIL image, caption)`, `source.path(i)` the image's path, `source.rows()` every
    `(image path, caption)`."""

    root: str
    files: list[str]
    captions: list[str]

    def __len__(self) -> int:
        return len(self.files)

    def caption(self, index: int) -> str:
        return self.captions[index]

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


def _caption_text(value, where: str, column: str) -> str:
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return value[0]  # several captions: the first one
    if not isinstance(value, str):
        raise InputError(f"{where}: caption column {column!r} must hold text, got {value!r}.")
    return value


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
    files, captions = [], []
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
        captions.append(_caption_text(row[caption_column], f"{meta_path} entry {line_no}", caption_column))
    missing = sorted(set(images) - set(files))
    if missing:
        shown = ", ".join(missing[:5]) + (f", ... ({len(missing)} in all)" if len(missing) > 5 else "")
        raise InputError(f"images without captions in {root}: {shown}; add them to {meta_path}.")
    if max_samples is not None:
        files, captions = files[:max_samples], captions[:max_samples]
    warn_empty_captions(captions, lambda i: f"{meta_path} entry {i + 1} ({files[i]})")
    source = FolderSource(root, files, captions)
    if verify:
        source.verify()
    return source


class HubDatasetSource(ImageCaptionSource):
    def __init__(self, dataset, image_column: str, caption_column: str, name: str):
        self.dataset, self.image_column, self.caption_column, self.name = dataset, image_column, caption_column, name

    def __len__(self) -> int:
        return len(self.dataset)

    def caption(self, index: int) -> str:
        return _caption_text(self.dataset[index][self.caption_column], self.describe(index), self.caption_column)

    def image(self, index: int) -> Image.Image:
        value = self.dataset[index][self.image_column]
        try:
            if isinstance(value, Image.Image):
                return value
            if isinstance(value, dict) and value.get("bytes") is not None:
                import io

                return Image.open(io.BytesIO(value["bytes"]))
            if isinstance(value, dict) and value.get("path"):
                return Image.open(value["path"])
            if isinstance(value, str):
                return Image.open(value)
        except Exception as e:
            raise InputError(f"unreadable image in {self.describe(index)}: {e}") from None
        raise InputError(f"{self.describe(index)}: column {self.image_column!r} holds no image ({type(value).__name__}).")

    def describe(self, index: int) -> str:
        return f"{self.name} row {index}"


def load_hub_dataset(name: str, config_name: str | None, split: str, image_column: str, caption_column: str,
                     cache_dir: str | None = None, max_samples: int | None = None) -> HubDatasetSource:
    try:
        import datasets
    except ImportError:
        raise InputError(
            f"--dataset_name {name!r} needs the `datasets` package: pip install datasets "
            "(or use --train_data_dir with a folder of images and metadata.jsonl)."
        ) from None
    try:
        ds = datasets.load_dataset(name, config_name, split=split, cache_dir=cache_dir)
    except Exception as e:
        raise InputError(f"could not load dataset {name!r} (split {split!r}): {e}") from None
    for option, column in (("--image_column", image_column), ("--caption_column", caption_column)):
        if column not in ds.column_names:
            raise InputError(
                f"{option} {column!r} not found in dataset {name!r}; its columns are {', '.join(ds.column_names)}."
            )
    if max_samples is not None:
        ds = ds.select(range(min(max_samples, len(ds))))
    if len(ds) == 0:
        raise InputError(f"dataset {name!r} split {split!r} is empty.")
    captions = [_caption_text(value, f"{name} row {i}", caption_column) for i, value in enumerate(ds[caption_column])]
    warn_empty_captions(captions, lambda i: f"{name} row {i}")
    return HubDatasetSource(ds, image_column, caption_column, name)


def load_source(args) -> ImageCaptionSource:
    if args.train_data_dir:
        if not os.path.isdir(args.train_data_dir):
            raise InputError(f"--train_data_dir {args.train_data_dir!r}: no such folder.")
        return load_image_folder(args.train_data_dir, args.caption_column, args.max_train_samples)
    return load_hub_dataset(args.dataset_name, args.dataset_config_name, args.dataset_split, args.image_column,
                            args.caption_column, args.cache_dir, args.max_train_samples)


# ----------------------------------------------------------------------------------------------------------
# Transform
# ----------------------------------------------------------------------------------------------------------
def image_to_tensor(image: Image.Image, resolution: int, flip: bool = False) -> torch.Tensor:
    """RGB, short side -> `resolution` (bicubic), centre crop, optional mirror; [3, R, R] in [-1, 1]."""
    image = ImageOps.exif_transpose(image).convert("RGB")
    w, h = image.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


# ----------------------------------------------------------------------------------------------------------
# Dataset and deterministic, resumable order
# ----------------------------------------------------------------------------------------------------------
class TrainDataset(torch.utils.data.Dataset):
    """Items are keyed by `(index, flip)` (the sampler's keys). Each item holds `index`, `flip`, and either
    `pixel_values` or, with a latent cache, `latent_params`; and either `caption` or, with a text cache,
    the cache's tensors (see `text.PromptEncoder`)."""

    def __init__(self, source: ImageCaptionSource, resolution: int, latent_cache: DiskCache | None = None,
                 text_cache: ExampleRows | None = None):
        self.source, self.resolution = source, resolution
        self.latent_cache, self.text_cache = latent_cache, text_cache

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key):
        index, flip = key if isinstance(key, tuple) else (key, False)
        item = {"index": index, "flip": flip}
        if self.latent_cache is not None:
            item["latent_params"] = self.latent_cache.get(index, "flipped" if flip else "plain")
        else:
            item["pixel_values"] = image_to_tensor(self.source.image(index), self.resolution, flip)
        if self.text_cache is not None:
            item.update(self.text_cache[index])
        else:
            item["caption"] = self.source.caption(index)
        return item


def collate(items: list[dict]) -> dict:
    out = {}
    for key in items[0]:
        values = [item[key] for item in items]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Endless micro-batches of `(index, flip)` keys for one process, starting at micro-batch `start`.

    Micro-batch m of process r: epoch e, batch j = divmod(m, batches_per_epoch); the epoch's permutation
    (and flips) come from `torch.Generator().manual_seed(seed + e)`; rows [j*G + r*B, j*G + (r+1)*B) with
    G = B * num_processes. Nothing depends on state outside (seed, m), so resuming is exact.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int, num_processes: int = 1,
                 process_index: int = 0, random_flip: bool = False, start: int = 0):
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self.num_processes, self.process_index = num_processes, process_index
        self.random_flip, self.start = random_flip, start
        self.global_batch = batch_size * num_processes
        self.batches_per_epoch = num_examples // self.global_batch
        if self.batches_per_epoch == 0:
            raise InputError(
                f"the dataset has {num_examples} example(s), fewer than one global batch (train_batch_size "
                f"{batch_size} x {num_processes} process(es) = {self.global_batch}); lower --train_batch_size."
            )

    def epoch_order(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(int(self.seed) + epoch)
        perm = torch.randperm(self.num_examples, generator=g)
        flips = torch.rand(self.num_examples, generator=g) < 0.5
        if not self.random_flip:
            flips = torch.zeros_like(flips)
        return perm, flips

    def batch(self, micro_batch: int) -> list[tuple[int, bool]]:
        epoch, j = divmod(micro_batch, self.batches_per_epoch)
        perm, flips = self.epoch_order(epoch)
        lo = j * self.global_batch + self.process_index * self.batch_size
        rows = perm[lo: lo + self.batch_size]
        return [(int(i), bool(flips[i])) for i in rows]

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        m = self.start
        cached_epoch, perm, flips = None, None, None
        while True:
            epoch, j = divmod(m, self.batches_per_epoch)
            if epoch != cached_epoch:
                perm, flips = self.epoch_order(epoch)
                cached_epoch = epoch
            lo = j * self.global_batch + self.process_index * self.batch_size
            yield [(int(i), bool(flips[i])) for i in perm[lo: lo + self.batch_size]]
            m += 1


def make_dataloader(dataset: TrainDataset, sampler: ResumableBatchSampler, num_workers: int) -> torch.utils.data.DataLoader:
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
