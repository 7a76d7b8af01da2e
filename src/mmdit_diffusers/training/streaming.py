"""Streamed training data: WebDataset-style tar shards (`--train_shards`) and `datasets` streams (`--dataset_name
... --streaming`), split across processes and resumable.

Tar shards (read with the standard library's `tarfile`; no `webdataset` package)
    Uncompressed `.tar` files whose members are grouped into samples by key, the member name up to the first dot
    of its base name (WebDataset's convention): `0001.jpg` + `0001.txt` (or `0001.json`). The image is the member
    with an image extension; the caption is the `.{caption_column}` member, else the `.txt` member, else the
    `caption_column` field of the `.json` member (a list there: several captions). Process r of P owns shards
    r, r+P, r+2P, ... of the sorted shard list (disjoint; at least one each) and indexes a shard's tar headers (no
    pixels) when its stream first reaches it. Its stream is endless: local epoch e reads its shards in an order
    shuffled by (seed, e, r), the samples of each shard in an order shuffled by (seed, e, shard). Micro-batch m is
    local samples [m*B, (m+1)*B), found from the indexes without reading any image before it: resuming is exact,
    and dataloader workers each read only their own micro-batches.

`datasets` streams (`IterableDataset`)
    `load_dataset(..., streaming=True)` (or a `save_to_disk` folder through `to_iterable_dataset`), shuffled with a
    buffer (`--shuffle_buffer_size`, seeded; `set_epoch(e)` reshuffles each local epoch) and split with
    `datasets.distributed.split_dataset_by_node`: whole shards per process when the shard count divides by the
    process count, otherwise every P-th example (disjoint either way). Resuming at micro-batch m replays the stream
    and skips this process's first m*B samples (undecoded; whole local epochs unread once the first epoch's length
    is known): exact as long as the dataset's files are unchanged, but the current epoch is read again up to that
    point. Read in the main process (no dataloader workers).

Per sample, the flip (with --random_flip) and the `draw` (random crop, caption choice) come from a
`random.Random` seeded by the seed, the local epoch and the sample's identity, so they repeat on resume.
"""

from __future__ import annotations

import glob
import io
import itertools
import json
import logging
import os
import random
import tarfile
from dataclasses import dataclass

import torch
from PIL import Image

from ..errors import InputError
from .data import (
    IMAGE_EXTENSIONS,
    SampleKey,
    caption_list,
    check_columns,
    choose_caption,
    collate,
    open_dataset,
    open_image_value,
    data_files_value,
)

logger = logging.getLogger("mmdit_diffusers.train")

TAR_IMAGE_EXTENSIONS = {ext.lstrip(".") for ext in IMAGE_EXTENSIONS}


def _sample_rng(*parts) -> random.Random:
    """A generator seeded by the parts (a string seed: the same on every run and machine)."""
    return random.Random(":".join(map(str, parts)))


def _flip_and_draw(rng: random.Random, random_flip: bool) -> tuple[bool, int]:
    flip = rng.random() < 0.5
    return (flip and random_flip), rng.getrandbits(31)


# ----------------------------------------------------------------------------------------------------------
# Tar shards
# ----------------------------------------------------------------------------------------------------------
@dataclass
class TarSample:
    """One sample of a shard: its key and the (offset, size, extension) of its image and caption members."""

    key: str
    image: tuple[int, int, str]
    caption: tuple[int, int, str]


def expand_shards(patterns: list[str]) -> list[str]:
    """Files, folders (their `*.tar`) and glob patterns -> the sorted list of shard paths."""
    paths = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(glob.glob(os.path.join(pattern, "*.tar")))
        elif any(c in pattern for c in "*?["):
            found = sorted(glob.glob(pattern))
        else:
            found = [pattern] if os.path.isfile(pattern) else []
        if not found:
            raise InputError(f"--train_shards {pattern!r}: no such file, or no .tar file matches it.")
        paths += found
    return sorted(dict.fromkeys(os.path.abspath(p) for p in paths))


def _split_name(name: str) -> tuple[str, str]:
    folder, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def index_shard(path: str, caption_column: str) -> list[TarSample]:
    """The samples of one shard, in file order, from its tar headers."""
    try:
        with tarfile.open(path, "r:") as tar:
            groups: dict[str, dict[str, tuple[int, int, str]]] = {}
            for member in tar:
                if member.isfile():
                    key, ext = _split_name(member.name)
                    groups.setdefault(key, {})[ext] = (member.offset_data, member.size, ext)
    except (tarfile.TarError, OSError) as e:
        raise InputError(f"--train_shards: {path} is not a readable uncompressed tar file ({e}).") from None
    samples = []
    for key, members in groups.items():
        image = next((members[ext] for ext in members if ext in TAR_IMAGE_EXTENSIONS), None)
        caption = next((members[ext] for ext in (caption_column, "txt", "json") if ext in members), None)
        if image is None or caption is None:
            missing = "image" if image is None else f"caption (.{caption_column}, .txt or .json member)"
            raise InputError(f"--train_shards: sample {key!r} of {path} has no {missing}; it has "
                             f"{', '.join('.' + e for e in members)}.")
        samples.append(TarSample(key, image, caption))
    if not samples:
        raise InputError(f"--train_shards: {path} holds no samples.")
    return samples


class TarShardSource:
    """WebDataset-style tar shards (see the module docstring); a shard is indexed when it is first needed."""

    def __init__(self, paths: list[str], caption_column: str):
        self.paths, self.caption_column = paths, caption_column
        self._indexes: dict[int, list[TarSample]] = {}
        self._files: dict[tuple[int, int], object] = {}  # (process id, shard) -> open file

    num_examples = None  # not counted: each process indexes only the shards its stream reaches

    def __getstate__(self):  # open files stay with their process (dataloader workers open their own)
        state = dict(self.__dict__)
        state["_files"] = {}
        return state

    def __del__(self):
        for f in self._files.values():
            f.close()

    def is_indexed(self, shard: int) -> bool:
        return shard in self._indexes

    def samples_of(self, shard: int) -> list[TarSample]:
        if shard not in self._indexes:
            self._indexes[shard] = index_shard(self.paths[shard], self.caption_column)
        return self._indexes[shard]

    def _read(self, shard: int, member: tuple[int, int, str]) -> bytes:
        # keyed by process: a forked dataloader worker must not share its parent's file position
        f = self._files.get((os.getpid(), shard))
        if f is None:
            f = self._files[(os.getpid(), shard)] = open(self.paths[shard], "rb")
        f.seek(member[0])
        return f.read(member[1])

    def read(self, shard: int, sample: TarSample) -> tuple[Image.Image, list[str]]:
        where = f"sample {sample.key!r} of {self.paths[shard]}"
        try:
            image = Image.open(io.BytesIO(self._read(shard, sample.image)))
        except Exception as e:
            raise InputError(f"unreadable image in {where}: {e}") from None
        return image, self._captions(shard, sample, where)

    def _captions(self, shard: int, sample: TarSample, where: str) -> list[str]:
        raw = self._read(shard, sample.caption).decode("utf-8")
        if sample.caption[2] != "json":
            return [raw.strip()]
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: the .json member is not valid JSON: {e}") from None
        if not isinstance(value, dict) or self.caption_column not in value:
            raise InputError(f"{where}: the .json member has no {self.caption_column!r} field (--caption_column).")
        return caption_list(value[self.caption_column], where, self.caption_column)

    def caption(self, index: int) -> str:
        """The first caption of sample `index` in file order (the first shard's samples first)."""
        for shard in range(len(self.paths)):
            samples = self.samples_of(shard)
            if index < len(samples):
                sample = samples[index]
                return self._captions(shard, sample, f"sample {sample.key!r} of {self.paths[shard]}")[0]
            index -= len(samples)
        raise IndexError(index)

    def process_stream(self, seed: int, num_processes: int, process_index: int, random_flip: bool) -> "TarStream":
        if len(self.paths) < num_processes:
            raise InputError(f"--train_shards: {len(self.paths)} shard(s) for {num_processes} processes; each process "
                             "reads its own shards, so give at least as many shards as processes.")
        return TarStream(self, list(range(process_index, len(self.paths), num_processes)), seed, process_index,
                         random_flip)


class TarStream:
    """Process-local endless stream over owned shards; `sample(p)` is local sample p (random access).

    Shards are indexed when the stream first reaches them (a fresh run reads one shard's headers to start; a
    resumed run indexes the shards before its position), and a cursor makes walking forward cheap."""

    def __init__(self, source: TarShardSource, shards: list[int], seed: int, process_index: int, random_flip: bool):
        self.source, self.shards, self.seed = source, shards, seed
        self.process_index, self.random_flip = process_index, random_flip
        self._cursor = (0, 0, 0)  # (local epoch, slot in the epoch's shard order, position of the slot's first sample)
        self._orders: dict[tuple[int, int], list[int]] = {}

    def shard_order(self, epoch: int) -> list[int]:
        order = list(self.shards)
        _sample_rng(self.seed, epoch, self.process_index).shuffle(order)
        return order

    def _sample_order(self, epoch: int, shard: int) -> list[int]:
        if (epoch, shard) not in self._orders:
            if len(self._orders) > 8:
                self._orders.clear()
            order = list(range(len(self.source.samples_of(shard))))
            _sample_rng(self.seed, epoch, os.path.basename(self.source.paths[shard])).shuffle(order)
            self._orders[(epoch, shard)] = order
        return self._orders[(epoch, shard)]

    def locate(self, position: int) -> tuple[int, int, TarSample]:
        """(local epoch, shard, sample) at local position `position`."""
        epoch, slot, first = self._cursor if position >= self._cursor[2] else (0, 0, 0)
        if slot == 0 and all(map(self.source.is_indexed, self.shards)):  # whole epochs at once
            length = sum(len(self.source.samples_of(s)) for s in self.shards)
            skipped = (position - first) // length
            epoch, first = epoch + skipped, first + skipped * length
        order = self.shard_order(epoch)
        while True:
            count = len(self.source.samples_of(order[slot]))
            if position < first + count:
                break
            first += count
            slot += 1
            if slot == len(order):
                epoch, slot, order = epoch + 1, 0, self.shard_order(epoch + 1)
        self._cursor = (epoch, slot, first)
        shard = order[slot]
        return epoch, shard, self.source.samples_of(shard)[self._sample_order(epoch, shard)[position - first]]

    def sample(self, position: int):
        """(image, captions, flip, draw) of local sample `position`."""
        epoch, shard, sample = self.locate(position)
        image, captions = self.source.read(shard, sample)
        flip, draw = _flip_and_draw(_sample_rng(self.seed, epoch, shard, sample.key), self.random_flip)
        return image, captions, flip, draw

    def describe(self, position: int) -> str:
        epoch, shard, sample = self.locate(position)
        return f"sample {sample.key!r} of {os.path.basename(self.source.paths[shard])} (local epoch {epoch})"


# ----------------------------------------------------------------------------------------------------------
# `datasets` streams
# ----------------------------------------------------------------------------------------------------------
class DatasetStreamSource:
    """A `datasets.IterableDataset` with the image and caption columns."""

    num_examples = None

    def __init__(self, dataset, name: str, image_column: str, caption_column: str, shuffle_buffer_size: int):
        self.dataset, self.name = dataset, name
        self.image_column, self.caption_column = image_column, caption_column
        self.shuffle_buffer_size = shuffle_buffer_size

    def caption(self, index: int) -> str:
        row = next(itertools.islice(iter(self.dataset), index, None), None)
        if row is None:
            raise InputError(f"the stream of {self.name!r} has no example {index}.")
        return caption_list(row[self.caption_column], f"{self.name} example {index}", self.caption_column)[0]

    def process_stream(self, seed: int, num_processes: int, process_index: int,
                       random_flip: bool) -> "DatasetStream":
        from datasets.distributed import split_dataset_by_node

        ds = self.dataset.shuffle(seed=seed, buffer_size=self.shuffle_buffer_size)
        if num_processes > 1:
            shards = getattr(ds, "num_shards", None) or ds.n_shards  # `n_shards` before datasets 3
            whole = shards % num_processes == 0
            logger.info(f"The stream has {shards} shard(s) for {num_processes} processes: each process reads "
                        f"{'its own shards' if whole else f'every {num_processes}th example (it reads them all)'}.")
            ds = split_dataset_by_node(ds, rank=process_index, world_size=num_processes)
        return DatasetStream(self, ds, seed, process_index, random_flip)


class DatasetStream:
    """Process-local endless stream: local epochs of the (split, shuffled) `IterableDataset`."""

    def __init__(self, source: DatasetStreamSource, dataset, seed: int, process_index: int, random_flip: bool):
        self.source, self.dataset, self.seed = source, dataset, seed
        self.process_index, self.random_flip = process_index, random_flip

    def samples(self, start: int):
        """(position, image, captions, flip, draw) from local position `start` on; earlier ones are skipped
        without decoding their images (whole local epochs without reading them, once the first epoch's length is
        known)."""
        source, position, epoch_length = self.source, 0, None
        for epoch in itertools.count():
            if epoch_length is not None and position + epoch_length <= start:
                position += epoch_length
                continue
            self.dataset.set_epoch(epoch)
            offset = -1
            for offset, row in enumerate(self.dataset):
                if position >= start:
                    where = f"{source.name} (local epoch {epoch}, example {offset})"
                    if source.image_column not in row or source.caption_column not in row:
                        check_columns(list(row), source.name, source.image_column, source.caption_column)
                    image = open_image_value(row[source.image_column], where, source.image_column)
                    captions = caption_list(row[source.caption_column], where, source.caption_column)
                    rng = _sample_rng(self.seed, epoch, self.process_index, offset)
                    yield (position, image, captions, *_flip_and_draw(rng, self.random_flip))
                position += 1
            if offset < 0:
                raise InputError(f"the stream of {source.name!r} gives process {self.process_index} no examples.")
            epoch_length = offset + 1


def load_stream_source(args):
    """The stream of `args`: tar shards (--train_shards) or a `datasets` stream (--dataset_name --streaming)."""
    if args.train_shards:
        paths = expand_shards(args.train_shards)
        source = TarShardSource(paths, args.caption_column)
        source.samples_of(0)  # the first shard's problems show before the models load
        return source
    ds = open_dataset(args.dataset_name, args.dataset_config_name, args.dataset_split, args.cache_dir, args.data_dir,
                      data_files_value(args.data_files), streaming=True)
    check_columns(ds.column_names, args.dataset_name, args.image_column, args.caption_column)
    features = getattr(ds, "features", None)
    if features is not None and args.image_column in features:
        import datasets

        if isinstance(features[args.image_column], datasets.Image):  # decode only what is used (not skipped rows)
            ds = ds.cast_column(args.image_column, datasets.Image(decode=False))
    return DatasetStreamSource(ds, args.dataset_name, args.image_column, args.caption_column,
                               args.shuffle_buffer_size)


# ----------------------------------------------------------------------------------------------------------
# Micro-batches
# ----------------------------------------------------------------------------------------------------------
def _item(dataset, position: int, image, captions, flip: bool, draw: int) -> dict:
    key = SampleKey(position, flip, draw)
    return {"index": position, "flip": flip, "pixel_values": dataset.pixels(image, key),
            "caption": choose_caption(captions, draw)}


class _TarBatches(torch.utils.data.IterableDataset):
    """Micro-batches start, start+1, ... of a tar stream; dataloader worker w of k makes those with
    (m - start) % k == w, and the loader's round-robin puts them back in order."""

    def __init__(self, stream: TarStream, dataset, batch_size: int, start: int):
        self.stream, self.dataset, self.batch_size, self.start = stream, dataset, batch_size, start

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for m in itertools.count(self.start + worker, workers):
            positions = range(m * self.batch_size, (m + 1) * self.batch_size)
            yield collate([_item(self.dataset, p, *self.stream.sample(p)) for p in positions])


class StreamingBatches:
    """The stream counterpart of `data.ResumableBatchSampler`: micro-batch m of this process is its local samples
    [m*B, (m+1)*B); `start` is where the loader begins (set when resuming). `batches_per_epoch` is None (a stream
    has no fixed epoch)."""

    batches_per_epoch = None

    def __init__(self, source, batch_size: int, seed: int, num_processes: int = 1, process_index: int = 0,
                 random_flip: bool = False, start: int = 0):
        self.stream = source.process_stream(seed, num_processes, process_index, random_flip)
        self.batch_size, self.start = batch_size, start

    def loader(self, dataset, num_workers: int):
        """An iterable of collated micro-batches from `start` on."""
        first = self.start * self.batch_size
        if isinstance(self.stream, TarStream):
            if first:
                logger.info(f"Resuming the shard stream at this process's sample {first}, "
                            f"{self.stream.describe(first)} (exact).")
            return torch.utils.data.DataLoader(_TarBatches(self.stream, dataset, self.batch_size, self.start),
                                               batch_size=None, num_workers=num_workers)
        if first:
            logger.info(f"Resuming the stream: skipping this process's first {first} samples (exact while the "
                        "dataset's files are unchanged; they are read again, not decoded).")
        if num_workers:
            logger.info("A `datasets` stream is read in the main process; --dataloader_num_workers is not used.")
        return self._dataset_batches(dataset)

    def _dataset_batches(self, dataset):
        samples = self.stream.samples(self.start * self.batch_size)
        while True:
            yield collate([_item(dataset, *next(samples)) for _ in range(self.batch_size)])
