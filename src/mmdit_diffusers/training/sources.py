"""The run's training data and its order: a map-style source (`data.py`) or a stream (`streaming.py`), whichever
the arguments ask for."""

from __future__ import annotations

import os

from ..errors import InputError
from .data import (
    ImageCaptionSource,
    ResumableBatchSampler,
    data_files_value,
    load_hub_dataset,
    load_image_folder,
)
from .streaming import StreamingBatches, load_stream_source


def load_source(args):
    """The training data of `args`: an `ImageCaptionSource` (map-style), or with --streaming / --train_shards a
    stream source (`streaming.py`)."""
    if getattr(args, "train_shards", None) or getattr(args, "streaming", False):
        return load_stream_source(args)
    if args.train_data_dir:
        if not os.path.isdir(args.train_data_dir):
            raise InputError(f"--train_data_dir {args.train_data_dir!r}: no such folder.")
        return load_image_folder(args.train_data_dir, args.caption_column, args.max_train_samples)
    return load_hub_dataset(args.dataset_name, args.dataset_config_name, args.dataset_split, args.image_column,
                            args.caption_column, args.cache_dir, args.max_train_samples, args.data_dir,
                            data_files_value(args.data_files))


def make_sampler(args, source, seed: int, num_processes: int, process_index: int, buckets=None):
    """The run's order of micro-batches: a `ResumableBatchSampler` over a map-style source, or a
    `StreamingBatches` over a stream."""
    if not isinstance(source, ImageCaptionSource):
        return StreamingBatches(source, args.train_batch_size, seed, num_processes, process_index, args.random_flip)
    return ResumableBatchSampler(len(source), args.train_batch_size, seed, num_processes, process_index,
                                 args.random_flip, buckets=buckets)
