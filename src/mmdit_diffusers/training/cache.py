"""Disk caches of encoder outputs for training (`--cache_latents`, `--cache_text_embeddings`).

A cache is a folder `<root>/<kind>-<fingerprint>/` of rows: row r is a few named tensors (a latent cache's row is an
example's VAE distribution, `plain` and, with --random_flip, `flipped`; a text cache's row is a distinct caption's
encoder outputs). The fingerprint hashes everything the rows depend on (`latent_key`, `text_key`): the encoder (its
class, config and a sample of every weight tensor, with dtype), the settings (resolution, flips, text length) and the
data (image files' names, sizes and modification times; the distinct captions). Another encoder or other data is
another folder; the same ones find the folder of an earlier run (or of the run being resumed) and reuse it.

Building (`build_or_reuse`): the main process checks the folder and tells every process (one small broadcast)
whether to reuse it or build it; to build, it empties the folder, then process p encodes rows
[p * N / P, (p + 1) * N / P) and writes them as its own shards `<p>-<k>.safetensors` (`ShardWriter`; each shard
written beside and renamed, so a killed build leaves no shard that looks complete); after a barrier the main process
checks that the shards hold every row once and writes `manifest.json` last: the mark of a complete cache. Rows are
never sent between processes. A folder without a manifest (a killed build) is built again; one whose manifest does
not match its shards (a shard missing, truncated, rows missing) is reported and built again.

Reading (`DiskCache`): every process opens the shards with safetensors' `safe_open`, which memory-maps them (its
tensors are views of the mapping), and copies out one row at a time, so a process holds only the rows in use and a
small index (two int32 per row); the pages read are the page cache's (file-backed, reclaimable), not the process's
own memory.

A shard stacks rows whose tensors have the same names, shapes and dtypes (`rows` names them), so examples whose
latents differ in shape (aspect-ratio buckets) go to different shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from ..errors import InputError
from ..files import atomic_file, folder_problem, safetensors_problem, write_text_atomically

logger = logging.getLogger("mmdit_diffusers.train")  # the trainer's logger: these messages are the run's log

FORMAT = 1
MANIFEST = "manifest.json"
SHARD_BYTES = 32 * 2**20
WEIGHT_SAMPLE = 4096  # values of each weight tensor that enter an encoder's fingerprint


class CacheDamaged(ValueError):
    """A cache folder whose files do not form the complete cache its manifest describes."""


# ----------------------------------------------------------------------------------------------------------
# Fingerprints
# ----------------------------------------------------------------------------------------------------------
def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def module_fingerprint(module: torch.nn.Module) -> str:
    """Hash of a model: class, config, and every state tensor's name, dtype, shape and `WEIGHT_SAMPLE` evenly spaced
    values (a fine-tuned or re-cast model changes it; reading a sample keeps this cheap for billion-weight encoders)."""
    h = hashlib.sha256(type(module).__name__.encode())
    config = getattr(module, "config", None)
    if config is not None:
        items = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        skip = ("_name_or_path", "_commit_hash", "transformers_version", "_diffusers_version", "torch_dtype", "dtype")
        h.update(_digest({k: v for k, v in items.items() if k not in skip}).encode())
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            flat = tensor.detach().reshape(-1)
            if flat.numel() > WEIGHT_SAMPLE:
                flat = flat[:: flat.numel() // WEIGHT_SAMPLE][:WEIGHT_SAMPLE]
            h.update(flat.contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    return _digest([type(tokenizer).__name__, tokenizer.model_max_length, sorted(tokenizer.get_vocab().items())])


def image_identities(source) -> str:
    """Hash naming a source's images: for files (a source with `path(i)`), each one's name, size and modification
    time; for a `datasets` dataset, its fingerprint; otherwise the decoded pixels of every image."""
    h = hashlib.sha256(str(len(source)).encode())
    if hasattr(source, "path"):
        root = getattr(source, "root", None)
        for i in range(len(source)):
            path = source.path(i)
            stat = os.stat(path)
            h.update(f"{os.path.relpath(path, root) if root else path}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
        return h.hexdigest()
    fingerprint = getattr(getattr(source, "dataset", None), "_fingerprint", None)
    if fingerprint:
        h.update(f"{fingerprint}\t{getattr(source, 'image_column', '')}".encode())
        return h.hexdigest()
    for i in range(len(source)):
        image = source.image(i)
        h.update(f"{image.mode}{image.size}".encode())
        h.update(image.tobytes())
    return h.hexdigest()


def latent_key(vae, source, resolution: int, random_flip: bool) -> dict:
    """What a latent cache's rows depend on (hashed into its folder name)."""
    return {"kind": "latents", "format": FORMAT, "vae": module_fingerprint(vae), "resolution": int(resolution),
            "random_flip": bool(random_flip), "images": image_identities(source)}


def text_key(pipe, encoders: list[str], tokenizers: dict[str, str], max_sequence_length: int, t5_attends_padding: bool,
             distinct_captions: list[str]) -> dict:
    """What a text cache's rows depend on: each encoder and its tokenizer, the T5 length and padding attention, the
    distinct captions in order (row i is caption i)."""
    return {"kind": "text", "format": FORMAT, "max_sequence_length": int(max_sequence_length),
            "t5_attends_padding": bool(t5_attends_padding), "clip_length": getattr(pipe, "tokenizer_max_length", None),
            "encoders": {name: [module_fingerprint(getattr(pipe, name)),
                                tokenizer_fingerprint(getattr(pipe, tokenizers[name]))] for name in encoders},
            "captions": _digest(distinct_captions), "num_captions": len(distinct_captions)}


def cache_folder(root: str, key: dict) -> str:
    return os.path.join(root, f"{key['kind']}-{_digest(key)[:16]}")


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------
class ShardWriter:
    """Rows -> safetensors shards `<prefix>-<k>.safetensors` in `folder`, each written atomically. Rows with the same
    tensor names, shapes and dtypes are stacked into one shard (with `rows`, their row numbers) until it holds about
    `shard_bytes`; at most one such shard per kind of row is in memory."""

    def __init__(self, folder: str, prefix: str, shard_bytes: int = SHARD_BYTES):
        self.folder, self.prefix, self.shard_bytes = folder, prefix, shard_bytes
        self.pending: dict[tuple, tuple[list[int], list[dict[str, torch.Tensor]], int]] = {}
        self.written: list[str] = []

    def add(self, row: int, tensors: dict[str, torch.Tensor]) -> None:
        kind = tuple((name, t.dtype, tuple(t.shape)) for name, t in sorted(tensors.items()))
        rows, values, size = self.pending.setdefault(kind, ([], [], 0))
        rows.append(int(row))
        values.append({name: t.detach().cpu() for name, t in tensors.items()})
        size += sum(t.numel() * t.element_size() for t in tensors.values())
        self.pending[kind] = (rows, values, size)
        if size >= self.shard_bytes:
            self._flush(kind)

    def _flush(self, kind) -> None:
        from safetensors.torch import save

        rows, values, _ = self.pending.pop(kind)
        tensors = {name: torch.stack([v[name] for v in values]) for name in values[0]}
        tensors["rows"] = torch.tensor(rows, dtype=torch.int64)
        del values  # at most two copies of a shard in memory: stacked, and serialised
        name = f"{self.prefix}-{len(self.written):05d}.safetensors"
        with atomic_file(os.path.join(self.folder, name)) as f:
            f.write(save(tensors))
        self.written.append(name)

    def close(self) -> list[str]:
        for kind in list(self.pending):
            self._flush(kind)
        return self.written


# ----------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------
class DiskCache:
    """The rows of a complete cache folder: `cache[r]` is row r's tensors (a dict), `cache.get(r, name)` one of
    them. Shards are memory-mapped on first use (also again in each DataLoader worker: handles are not pickled)."""

    def __init__(self, folder: str):
        self.folder = folder
        path = os.path.join(folder, MANIFEST)
        try:
            with open(path, encoding="utf-8") as f:
                self.manifest = json.load(f)
            self.num_rows = int(self.manifest["num_rows"])
            self.shards = list(self.manifest["shards"])
        except FileNotFoundError:
            raise CacheDamaged(f"it has no {MANIFEST} (an unfinished build)") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CacheDamaged(f"{path} is unreadable ({type(e).__name__}: {e})") from None
        for name, size in self.shards:
            shard = os.path.join(folder, name)
            problem = safetensors_problem(shard) if os.path.isfile(shard) else "is missing"
            if problem is None and os.path.getsize(shard) != size:
                problem = f"has {os.path.getsize(shard):,} bytes, the manifest says {size:,}"
            if problem:
                raise CacheDamaged(f"shard {name} {problem}")
        self._handles, self._tensors = None, {}
        self._index()

    def _index(self) -> None:
        self.shard_of = np.full(self.num_rows, -1, dtype=np.int32)
        self.position = np.zeros(self.num_rows, dtype=np.int32)
        for k, handle in enumerate(self._open()):
            rows = handle.get_tensor("rows").numpy()
            if len(rows) and (rows.min() < 0 or rows.max() >= self.num_rows or (self.shard_of[rows] >= 0).any()):
                raise CacheDamaged(f"shard {self.shards[k][0]} holds rows outside 0..{self.num_rows - 1} or rows "
                                   "another shard holds")
            self.shard_of[rows] = k
            self.position[rows] = np.arange(len(rows), dtype=np.int32)
        missing = np.flatnonzero(self.shard_of < 0)
        if len(missing):
            raise CacheDamaged(f"{len(missing)} of {self.num_rows} rows are in no shard (row {missing[0]}, ...)")

    def _open(self) -> list:
        if self._handles is None:
            from safetensors import safe_open

            self._handles = [safe_open(os.path.join(self.folder, name), framework="pt") for name, _ in self.shards]
            self._tensors = {}
        return self._handles

    def _tensor(self, shard: int, name: str) -> torch.Tensor:
        """A shard's stacked tensor: safetensors returns a view of the mapped file (no copy, nothing read yet)."""
        key = (shard, name)
        if key not in self._tensors:
            self._tensors[key] = self._open()[shard].get_tensor(name)
        return self._tensors[key]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": None, "_tensors": {}}

    def __len__(self) -> int:
        return self.num_rows

    def get(self, row: int, name: str) -> torch.Tensor:
        # a copy of the row, so that it outlives the mapping and changes to the file
        return self._tensor(int(self.shard_of[row]), name)[int(self.position[row])].clone()

    def __getitem__(self, row: int) -> dict[str, torch.Tensor]:
        shard = int(self.shard_of[row])
        return {name: self.get(row, name) for name in self._open()[shard].keys() if name != "rows"}


class ExampleRows:
    """A cache read through a row number per example (`rows[i]`): example i's row of a text cache is its caption's."""

    def __init__(self, cache: DiskCache, rows: Iterable[int]):
        self.cache, self.rows = cache, np.asarray(list(rows), dtype=np.int32)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.cache[int(self.rows[index])]


# ----------------------------------------------------------------------------------------------------------
# Build or reuse
# ----------------------------------------------------------------------------------------------------------
def _decide(folder: str, root: str, option: str) -> tuple[str, str]:
    """("reuse" | "build" | "error", message), on the main process; emptied, ready to build, when "build"."""
    if os.path.isdir(folder):
        if not os.path.isfile(os.path.join(folder, MANIFEST)):
            logger.info(f"The cache {folder} was left unfinished (no {MANIFEST}); building it again.")
        else:
            try:
                DiskCache(folder)
                return "reuse", ""
            except CacheDamaged as e:
                logger.warning(f"the cache {folder} is damaged: {e}; building it again.")
        shutil.rmtree(folder)
    problem = folder_problem(root)
    if problem:
        return "error", f"{option} {root!r}: cannot write the cache there: {problem}."
    os.makedirs(folder)
    return "build", ""


def build_or_reuse(root: str, key: dict, num_rows: int, encode: Callable[[list[int]], Iterator[tuple[int, dict]]],
                   accelerator, what: str, option: str = "--embeddings_cache_dir",
                   shard_bytes: int | None = None) -> DiskCache:
    """The cache of `key` under `root`: reused when complete, else built by all processes together.

    `encode(rows)` yields `(row, {name: tensor})` for each of the given rows; each process calls it on its slice of
    `range(num_rows)`. `what` describes the rows for the log ("latents of 20000 images")."""
    from accelerate.utils import broadcast_object_list

    folder = cache_folder(root, key)
    decision = [None]
    if accelerator.is_main_process:
        try:
            decision = [_decide(folder, root, option)]
        except OSError as e:  # told to every process below, which would otherwise wait for the main one
            decision = [("error", f"{option} {root!r}: cannot write the cache there: {e}.")]
    if accelerator.num_processes > 1:
        broadcast_object_list(decision)
    action, message = decision[0]
    if action == "error":
        raise InputError(message)
    if action == "reuse":
        logger.info(f"Reusing cache {folder} ({what}).")
        return DiskCache(folder)

    logger.info(f"Caching {what} in {folder}.")
    world, rank = accelerator.num_processes, accelerator.process_index
    writer = ShardWriter(folder, f"{rank:05d}", shard_bytes or SHARD_BYTES)
    for row, tensors in encode(list(range(rank * num_rows // world, (rank + 1) * num_rows // world))):
        writer.add(row, tensors)
    writer.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shards = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors") and not n.startswith("."))
        manifest = {"format": FORMAT, "key": key, "num_rows": num_rows,
                    "shards": [[n, os.path.getsize(os.path.join(folder, n))] for n in shards]}
        write_text_atomically(os.path.join(folder, MANIFEST), json.dumps(manifest, indent=1))
    accelerator.wait_for_everyone()
    try:
        return DiskCache(folder)
    except CacheDamaged as e:  # a shard lost between the build and now: nothing to do but report it
        raise InputError(f"the cache {folder} just built is damaged: {e}; delete the folder and run again.") from None
